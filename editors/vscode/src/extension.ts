/**
 * sdsat-lsp for VS Code: inline completion (ghost text) from the sdsat-lsp language server.
 * Wires the settings, the status bar item and the commands to the server controller.
 */
import * as vscode from 'vscode';
import { Server } from './server';
import { affectsServer, needsRestart } from './settings';
import { Status } from './status';

const ENABLED_KEY = 'sdsat.enabled';

let server: Server | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
    const log = vscode.window.createOutputChannel('sdsat-lsp', { log: true });
    const status = new Status();
    let enabled = context.globalState.get<boolean>(ENABLED_KEY, true);
    server = new Server(log, status, () => enabled);
    const srv = server;

    const setEnabled = async (value: boolean): Promise<void> => {
        enabled = value;
        status.setEnabled(value);
        await context.globalState.update(ENABLED_KEY, value);
        await vscode.commands.executeCommand('setContext', ENABLED_KEY, value);
        await srv.pushSettings();
    };

    context.subscriptions.push(
        log,
        status,
        srv,
        vscode.commands.registerCommand('sdsat.enable', () => setEnabled(true)),
        vscode.commands.registerCommand('sdsat.disable', () => setEnabled(false)),
        vscode.commands.registerCommand('sdsat.restart', () => srv.restart()),
        vscode.commands.registerCommand('sdsat.showLog', () => log.show()),
        vscode.commands.registerCommand('sdsat.menu', () => showMenu(enabled)),
        // Restricted Mode hides the workspace's values of the restricted settings (package.json:
        // capabilities.untrustedWorkspaces); once the user trusts the folder they apply.
        vscode.workspace.onDidGrantWorkspaceTrust(() => srv.pushSettings()),
        vscode.workspace.onDidChangeConfiguration(async (event) => {
            if (needsRestart(event)) {
                await srv.restart();
            } else if (affectsServer(event)) {
                await srv.pushSettings();
            }
        }),
    );
    status.setEnabled(enabled);
    await vscode.commands.executeCommand('setContext', ENABLED_KEY, enabled);
    // Not awaited: activation must not wait for the server (its errors are shown by the controller).
    void srv.start();
}

export async function deactivate(): Promise<void> {
    await server?.stop();
    server = undefined;
}

async function showMenu(enabled: boolean): Promise<void> {
    const items: (vscode.QuickPickItem & { command: string; args?: unknown[] })[] = [
        enabled
            ? { label: '$(circle-slash) Disable inline completion', command: 'sdsat.disable' }
            : { label: '$(check) Enable inline completion', command: 'sdsat.enable' },
        { label: '$(debug-restart) Restart the server', command: 'sdsat.restart' },
        { label: '$(output) Show the server log', command: 'sdsat.showLog' },
        { label: '$(settings-gear) Open settings', command: 'workbench.action.openSettings', args: ['sdsat.'] },
    ];
    const choice = await vscode.window.showQuickPick(items, { title: 'sdsat-lsp' });
    if (choice) {
        await vscode.commands.executeCommand(choice.command, ...(choice.args ?? []));
    }
}
