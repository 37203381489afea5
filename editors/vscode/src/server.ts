/**
 * The sdsat-lsp server process and its language client: start, stop, restart, settings, and the
 * messages a user sees when the command is missing or the server dies.
 *
 * The extension spawns the process itself (instead of handing vscode-languageclient an Executable)
 * for two reasons: a missing command is known before the client exists, so the user gets one clear
 * message with the fix rather than the client's generic "couldn't create connection"; and the exit
 * code or signal of a crashed server is at hand for the crash message.
 */
import { ChildProcess, spawn } from 'node:child_process';
import * as os from 'node:os';
import * as vscode from 'vscode';
import {
    CloseAction,
    CloseHandlerResult,
    DidChangeConfigurationNotification,
    ErrorAction,
    ErrorHandlerResult,
    FeatureState,
    LanguageClient,
    LanguageClientOptions,
    ResponseError,
    RevealOutputChannelOn,
    StaticFeature,
    WorkDoneProgress,
    WorkDoneProgressCreateRequest,
} from 'vscode-languageclient/node';
import { documentSelector, LaunchSettings, launchSettings, SECTION, serverSettings } from './settings';
import { ServerState, Status } from './status';

/** The server's own notification: {state, message}. */
const STATUS_NOTIFICATION = 'sdsat/status';

interface StatusParams {
    state: ServerState;
    message?: string;
}

/** A spawned server: the process, how it ended (once it has), and its last stderr lines. */
class Process {
    readonly exited: Promise<string>;
    private readonly stderrTail: string[] = [];

    constructor(readonly child: ChildProcess) {
        this.exited = new Promise((resolve) => {
            child.once('exit', (code, signal) => resolve(signal ? `killed by ${signal}` : `exit code ${code}`));
        });
        // The language client copies stderr to the log too; this keeps the last lines for messages.
        child.stderr?.on('data', (chunk: Buffer) => {
            this.stderrTail.push(...chunk.toString('utf8').split('\n').filter((line) => line.trim()));
            this.stderrTail.splice(0, Math.max(0, this.stderrTail.length - 5));
        });
    }

    get running(): boolean {
        return this.child.exitCode === null && this.child.signalCode === null;
    }

    lastError(): string | undefined {
        return this.stderrTail[this.stderrTail.length - 1];
    }

    /** How the process ended, waiting up to `ms` for the exit event (it can trail the closed pipe). */
    async ending(ms: number): Promise<string> {
        const timeout = new Promise<string>((resolve) => setTimeout(() => resolve('its output closed'), ms));
        return Promise.race([this.exited, timeout]);
    }

    async kill(): Promise<void> {
        if (!this.running) {
            return;
        }
        this.child.kill('SIGTERM');
        if ((await this.ending(2000)) === 'its output closed') {
            this.child.kill('SIGKILL');
        }
    }
}

function spawnServer(launch: LaunchSettings): Promise<ChildProcess> {
    return new Promise((resolve, reject) => {
        const cwd = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath ?? os.homedir();
        // PYTHONSAFEPATH: a `python -m sdsat_lsp.cli` command must not import modules from the
        // workspace folder it starts in (the folder is the repository's, the command the user's).
        const env = { ...process.env, PYTHONSAFEPATH: '1' };
        const child = spawn(launch.command, launch.args, { cwd, env, stdio: 'pipe' });
        // ENOENT and EACCES arrive as an 'error' event instead of 'spawn'.
        child.once('error', reject);
        child.once('spawn', () => resolve(child));
    });
}

/**
 * Shows the server's `$/progress` in the status bar. vscode-languageclient's own progress feature
 * answers `window/workDoneProgress/create` too; features registered by the extension initialize
 * after the built-in ones, so this handler is the one that serves the request.
 */
class LoadProgress implements StaticFeature {
    private readonly listeners = new Map<string | number, vscode.Disposable>();

    constructor(private readonly client: LanguageClient, private readonly status: Status) {}

    fillClientCapabilities(capabilities: { window?: { workDoneProgress?: boolean } }): void {
        capabilities.window = { ...capabilities.window, workDoneProgress: true };
    }

    getState(): FeatureState {
        return { kind: 'static' };
    }

    initialize(): void {
        this.client.onRequest(WorkDoneProgressCreateRequest.type, ({ token }) => {
            this.listeners.get(token)?.dispose();
            const listener = this.client.onProgress(WorkDoneProgress.type, token, (value) => {
                if (value.kind === 'end') {
                    this.listeners.get(token)?.dispose();
                    this.listeners.delete(token);
                } else {
                    this.status.progress(value.message, value.percentage);
                }
            });
            this.listeners.set(token, listener);
        });
    }

    clear(): void {
        for (const listener of this.listeners.values()) {
            listener.dispose();
        }
        this.listeners.clear();
    }
}

export class Server implements vscode.Disposable {
    private client: LanguageClient | undefined;
    private process: Process | undefined;
    // Starts, stops and restarts run one after another: settings can change while a start is under way.
    private queue: Promise<void> = Promise.resolve();

    constructor(
        private readonly log: vscode.LogOutputChannel,
        private readonly status: Status,
        private readonly isEnabled: () => boolean,
    ) {}

    start(): Promise<void> {
        return this.enqueue(() => this.doStart());
    }

    restart(): Promise<void> {
        return this.enqueue(async () => {
            await this.doStop();
            await this.doStart();
        });
    }

    stop(): Promise<void> {
        return this.enqueue(() => this.doStop());
    }

    /** Sends the current settings (push model); the server applies them, reloading the model if needed. */
    async pushSettings(): Promise<void> {
        const client = this.client;
        if (client?.isRunning()) {
            await client.sendNotification(DidChangeConfigurationNotification.type, {
                settings: { [SECTION]: serverSettings(this.isEnabled()) },
            });
        }
    }

    dispose(): void {
        void this.stop();
    }

    private enqueue(step: () => Promise<void>): Promise<void> {
        const next = this.queue.then(step, step);
        this.queue = next.catch((error: unknown) => this.log.error(`sdsat-lsp: ${String(error)}`));
        return this.queue;
    }

    private async doStart(): Promise<void> {
        const launch = launchSettings();
        const commandLine = [launch.command, ...launch.args].join(' ');
        this.status.set('starting', `starting ${commandLine}`);
        this.log.info(`starting ${commandLine}`);
        let child: ChildProcess;
        try {
            child = await spawnServer(launch);
        } catch (error) {
            this.reportSpawnError(launch, error as NodeJS.ErrnoException);
            return;
        }
        const proc = new Process(child);
        this.process = proc;
        const client = new LanguageClient('sdsat', 'sdsat-lsp', () => Promise.resolve(child), this.clientOptions(launch, proc));
        client.registerFeature(new LoadProgress(client, this.status));
        client.onNotification(STATUS_NOTIFICATION, (params: StatusParams) => {
            this.status.set(params.state, params.message ?? '');
        });
        this.client = client;
        try {
            await client.start();
        } catch (error) {
            // A server that died during start-up has been reported by the close handler already.
            if (proc.running) {
                this.status.set('error', `the server did not start: ${String(error)}`);
                void this.offerLog(`sdsat-lsp: the server did not start (${String(error)}).`);
                await proc.kill();
            }
        }
    }

    private async doStop(): Promise<void> {
        const client = this.client;
        const proc = this.process;
        // Cleared first, so that the close handler knows this stop was asked for.
        this.client = undefined;
        this.process = undefined;
        if (client?.isRunning()) {
            try {
                await client.stop(3000);
            } catch (error) {
                this.log.warn(`stopping the server: ${String(error)}`);
            }
        }
        await proc?.kill();
    }

    private clientOptions(launch: LaunchSettings, proc: Process): LanguageClientOptions {
        return {
            documentSelector: documentSelector(launch.languages),
            initializationOptions: serverSettings(this.isEnabled()),
            outputChannel: this.log,
            revealOutputChannelOn: RevealOutputChannelOn.Never,
            // The server's model load fails in ways the user can act on; the client must not retry.
            initializationFailedHandler: () => false,
            errorHandler: {
                error: (error): ErrorHandlerResult => {
                    this.log.error(`connection to the server: ${error.message}`);
                    return { action: ErrorAction.Continue, handled: true };
                },
                closed: (): Promise<CloseHandlerResult> => this.onClosed(proc),
            },
            middleware: {
                // Disabled: no request at all, so a disabled extension costs nothing.
                provideInlineCompletionItems: (document, position, context, token, next) =>
                    this.isEnabled() ? next(document, position, context, token) : undefined,
                workspace: {
                    // The server pulls the "sdsat" section; it gets only the settings it knows.
                    configuration: async (params, token, next): Promise<unknown[] | ResponseError> => {
                        const values = await next(params, token);
                        if (values instanceof ResponseError) {
                            return values;
                        }
                        return params.items.map((item, i): unknown =>
                            item.section === SECTION ? serverSettings(this.isEnabled()) : values[i]);
                    },
                },
            },
        };
    }

    private async onClosed(proc: Process): Promise<CloseHandlerResult> {
        if (proc !== this.process) {
            return { action: CloseAction.DoNotRestart, handled: true }; // a stop we asked for
        }
        const how = await proc.ending(1000);
        // After a signal the last output is whatever the server was printing (a progress bar);
        // after an exit code it is usually the error that ended it.
        const detail = how.startsWith('exit code') ? proc.lastError() : undefined;
        const message = `the server stopped unexpectedly (${how})`;
        this.log.error(`${message}${detail ? `; last output: ${detail}` : ''}`);
        this.status.set('stopped', message);
        void vscode.window
            .showErrorMessage(`sdsat-lsp: ${message}.${detail ? ` ${detail}` : ''}`, 'Restart', 'Show Log')
            .then((choice) => {
                if (choice === 'Restart') {
                    void this.restart();
                } else if (choice === 'Show Log') {
                    this.log.show();
                }
            });
        // Not restarted automatically: a server that crashes while loading would crash again.
        return { action: CloseAction.DoNotRestart, handled: true };
    }

    private reportSpawnError(launch: LaunchSettings, error: NodeJS.ErrnoException): void {
        this.log.error(`could not start ${launch.command}: ${error.message}`);
        if (error.code === 'ENOENT') {
            this.status.set('error', `server command not found: ${launch.command}`);
            void vscode.window
                .showErrorMessage(
                    `sdsat-lsp: the server command "${launch.command}" was not found. ` +
                        'Install it with "pip install sdsat-lsp", or set sdsat.serverCommand to its full path.',
                    'Open Settings',
                    'Show Log',
                )
                .then((choice) => {
                    if (choice === 'Open Settings') {
                        void vscode.commands.executeCommand('workbench.action.openSettings', `${SECTION}.serverCommand`);
                    } else if (choice === 'Show Log') {
                        this.log.show();
                    }
                });
        } else {
            this.status.set('error', `could not start ${launch.command}: ${error.message}`);
            void this.offerLog(`sdsat-lsp: could not start "${launch.command}" (${error.message}). Check sdsat.serverCommand.`);
        }
    }

    private async offerLog(message: string): Promise<void> {
        if ((await vscode.window.showErrorMessage(message, 'Show Log')) === 'Show Log') {
            this.log.show();
        }
    }
}
