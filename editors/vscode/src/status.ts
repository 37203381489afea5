/**
 * The status bar item: what the server is doing (starting, loading the model with its progress,
 * ready, error) and whether completion is enabled. An error or a stopped server links to the log;
 * otherwise a click opens a small menu.
 */
import * as vscode from 'vscode';

export type ServerState = 'starting' | 'loading' | 'ready' | 'error' | 'stopped';

const ICONS: Record<ServerState, string> = {
    starting: '$(loading~spin)',
    loading: '$(loading~spin)',
    ready: '$(check)',
    error: '$(error)',
    stopped: '$(debug-disconnect)',
};

export class Status implements vscode.Disposable {
    private readonly item: vscode.StatusBarItem;
    private state: ServerState = 'starting';
    private message = '';
    private percentage: number | undefined;
    private enabled = true;

    constructor() {
        this.item = vscode.window.createStatusBarItem('sdsat.status', vscode.StatusBarAlignment.Right, 100);
        this.item.name = 'sdsat-lsp';
        this.render();
        this.item.show();
    }

    set(state: ServerState, message: string): void {
        this.state = state;
        this.message = message;
        this.percentage = undefined;
        this.render();
    }

    /** A `$/progress` report; only shown while the server says it is loading or starting. */
    progress(message: string | undefined, percentage: number | undefined): void {
        if (this.state !== 'loading' && this.state !== 'starting') {
            return;
        }
        this.state = 'loading';
        if (message) {
            this.message = message;
        }
        this.percentage = percentage ?? this.percentage;
        this.render();
    }

    setEnabled(enabled: boolean): void {
        this.enabled = enabled;
        this.render();
    }

    private render(): void {
        const failed = this.state === 'error' || this.state === 'stopped';
        const disabled = !this.enabled && !failed;
        const percent = this.state === 'loading' && this.percentage !== undefined ? ` ${this.percentage}%` : '';
        this.item.text = `${disabled ? '$(circle-slash)' : ICONS[this.state]} sdsat${percent}`;
        const what = disabled ? 'disabled' : this.state;
        const summary = `sdsat-lsp: ${what}${percent}${this.message ? ` (${this.message})` : ''}`;
        // The label is what screen readers (and the end-to-end test) read: state and message in words.
        this.item.accessibilityInformation = { label: summary, role: 'button' };
        this.item.tooltip = failed ? `${summary}\nClick to open the log.` : `${summary}\nClick for sdsat-lsp commands.`;
        this.item.backgroundColor = this.state === 'error'
            ? new vscode.ThemeColor('statusBarItem.errorBackground')
            : this.state === 'stopped' ? new vscode.ThemeColor('statusBarItem.warningBackground') : undefined;
        this.item.command = failed ? 'sdsat.showLog' : 'sdsat.menu';
    }

    dispose(): void {
        this.item.dispose();
    }
}
