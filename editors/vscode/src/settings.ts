/**
 * The extension's settings, split into what the server reads (sent as initializationOptions,
 * workspace/didChangeConfiguration and answers to workspace/configuration) and what only the
 * client uses to start the server.
 */
import * as os from 'node:os';
import * as vscode from 'vscode';
import type { DocumentSelector } from 'vscode-languageclient/node';

export const SECTION = 'sdsat';

/** Settings the server understands, by their wire (camelCase) names: every `sdsat.*` setting in
 * package.json that is not a RESTART_KEY (tests/test_editor_settings.py holds the two lists to that). */
const SERVER_KEYS = [
    'model', 'quantize', 'device', 'k', 'lookupNgram', 'draftStore', 'treeNodes', 'cacheBudgetMb', 'draftLength', 'maxTokens',
    'timeBudgetMs', 'compile',
] as const;

/** Settings that need a new server process (a new command line or document selector). */
const RESTART_KEYS = ['serverCommand', 'serverArgs', 'enabledLanguages'] as const;

export type ServerSettings = Record<string, unknown>;

export function serverSettings(enabled: boolean): ServerSettings {
    const config = vscode.workspace.getConfiguration(SECTION);
    const settings: ServerSettings = { enabled };
    for (const key of SERVER_KEYS) {
        settings[key] = config.get(key);
    }
    return settings;
}

export interface LaunchSettings {
    command: string;
    args: string[];
    languages: string[];
}

export function launchSettings(): LaunchSettings {
    const config = vscode.workspace.getConfiguration(SECTION);
    const command = (config.get<string>('serverCommand') ?? '').trim() || 'sdsat-lsp';
    return {
        // A path typed by hand often starts with ~, which spawn() does not expand.
        command: command.startsWith('~/') ? os.homedir() + command.slice(1) : command,
        args: config.get<string[]>('serverArgs') ?? ['--stdio'],
        languages: config.get<string[]>('enabledLanguages') ?? [],
    };
}

export function documentSelector(languages: string[]): DocumentSelector {
    const schemes = ['file', 'untitled'];
    if (languages.includes('*')) {
        return schemes.map((scheme) => ({ scheme }));
    }
    return languages.flatMap((language) => schemes.map((scheme) => ({ scheme, language })));
}

export function needsRestart(event: vscode.ConfigurationChangeEvent): boolean {
    return RESTART_KEYS.some((key) => event.affectsConfiguration(`${SECTION}.${key}`));
}

export function affectsServer(event: vscode.ConfigurationChangeEvent): boolean {
    return SERVER_KEYS.some((key) => event.affectsConfiguration(`${SECTION}.${key}`));
}
