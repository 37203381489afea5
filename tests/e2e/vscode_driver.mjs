// Drives code-server (real VS Code in headless Chromium, through playwright-core) through the
// user-facing scenario of the sdsat-lsp extension, one step after another, and writes what it saw
// to a JSON file; tests/e2e/test_vscode.py starts code-server, runs this script and asserts.
//
//   node vscode_driver.mjs CONFIG.json
//
// Steps: missing server command -> model that fails to load -> default model ready -> ghost text,
// Tab, save -> disable/enable -> server killed -> Restart. A failed step is recorded and the next
// ones still run where they can, so that one launch reports every case.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = createRequire(import.meta.url)(config.playwright);

const result = { steps: {}, statusLabels: [], log: [] };
const started = Date.now();
const log = (message) => {
    const line = `[${((Date.now() - started) / 1000).toFixed(1)}s] ${message}`;
    result.log.push(line);
    console.log(line);
};
const save = () => fs.writeFileSync(config.result, JSON.stringify(result, null, 2));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function step(name, fn) {
    const t0 = Date.now();
    log(`step ${name}`);
    try {
        const detail = await fn();
        result.steps[name] = { ok: true, seconds: (Date.now() - t0) / 1000, ...detail };
    } catch (error) {
        result.steps[name] = { ok: false, seconds: (Date.now() - t0) / 1000, error: String(error?.stack ?? error) };
        log(`step ${name} failed: ${error}`);
        await screenshot(page, `${name}-failed`).catch(() => {});
    }
    save();
    return result.steps[name].ok;
}

async function screenshot(page, name) {
    const file = path.join(config.artifacts, `vscode-${name}.png`);
    await page.screenshot({ path: file });
    (result.screenshots ??= []).push(file);
    return file;
}

// ---- the page --------------------------------------------------------------------------------

const STATUS = '.statusbar-item [aria-label^="sdsat-lsp:"]';

async function statusLabel(page) {
    return page.locator(STATUS).first().getAttribute('aria-label', { timeout: 1000 }).catch(() => null);
}

/** Waits until the status item's label matches `re`; every label seen meanwhile is recorded. */
async function waitStatus(page, re, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    let label = null;
    while (Date.now() < deadline) {
        label = await statusLabel(page);
        if (label !== null && re.test(label)) {
            return label;
        }
        await sleep(200);
    }
    throw new Error(`status never matched ${re} in ${timeoutMs / 1000}s (last: ${label})`);
}

/** The text of a notification toast matching `re`, once one is shown. */
async function waitNotification(page, re, timeoutMs) {
    const toast = page.locator('.notification-toast').filter({ hasText: re }).first();
    await toast.waitFor({ state: 'visible', timeout: timeoutMs });
    const message = await toast.locator('.notification-list-item-message').innerText();
    const buttons = await toast.locator('.monaco-button').allInnerTexts();
    return { toast, message, buttons: buttons.map((b) => b.trim()).filter(Boolean) };
}

async function runCommand(page, title) {
    await page.keyboard.press('F1');
    const input = page.locator('.quick-input-widget input');
    await input.waitFor({ state: 'visible', timeout: 10000 });
    await input.fill(`>${title}`);
    await page.locator('.quick-input-list .monaco-list-row').filter({ hasText: title }).first()
        .waitFor({ state: 'visible', timeout: 10000 });
    await page.keyboard.press('Enter');
}

async function openFile(page, name) {
    await page.keyboard.press('F1');
    const input = page.locator('.quick-input-widget input');
    await input.waitFor({ state: 'visible', timeout: 10000 });
    await input.fill(name); // without the leading '>', the palette is Quick Open
    await page.locator('.quick-input-list .monaco-list-row').filter({ hasText: name }).first()
        .waitFor({ state: 'visible', timeout: 10000 });
    await page.keyboard.press('Enter');
}

async function clearNotifications(page) {
    await runCommand(page, 'Notifications: Clear All Notifications');
    await sleep(300);
}

function writeSettings(extra) {
    fs.writeFileSync(config.settingsFile, JSON.stringify({ ...config.baseSettings, ...extra }, null, 2));
}

/** Text of the inline suggestion on screen: the rest of the cursor's line and any lines below. */
async function ghostText(page) {
    return page.evaluate(() => {
        const inline = [...document.querySelectorAll('.ghost-text-decoration')].map((n) => n.textContent);
        const below = [...document.querySelectorAll('.ghost-text .view-line')].map((n) => n.textContent);
        const text = inline.join('') + (below.length ? '\n' + below.join('\n') : '');
        return text.replace(/\u00a0/g, ' ');
    });
}

async function waitGhost(page, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
        const text = await ghostText(page);
        if (text.trim()) {
            return text;
        }
        await sleep(150);
    }
    return '';
}

/** Server processes started by code-server (the extension spawns `python -m sdsat_lsp.cli`). */
function serverPids() {
    const parents = new Map();
    const commands = new Map();
    for (const entry of fs.readdirSync('/proc')) {
        if (!/^\d+$/.test(entry)) continue;
        try {
            const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
            parents.set(Number(entry), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
            commands.set(Number(entry), fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' '));
        } catch {
            // gone meanwhile
        }
    }
    const descends = (pid) => {
        for (let p = pid, hops = 0; p > 1 && hops < 64; p = parents.get(p) ?? 0, hops++) {
            if (p === config.codeServerPid) return true;
        }
        return false;
    };
    return [...commands].filter(([pid, cmd]) => cmd.includes('sdsat_lsp.cli') && descends(pid)).map(([pid]) => pid);
}

// ---- the scenario ----------------------------------------------------------------------------

const browser = await chromium.launch({
    executablePath: config.chromium,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
const page = await context.newPage();
page.on('pageerror', (error) => log(`page error: ${error.message}`));

/** An untrusted folder (Restricted Mode) whose .vscode/settings.json names a model: the server
 * must start with the user's command and load the default model, as if the workspace said nothing. */
async function untrustedScenario() {
    await step('restricted', async () => {
        await page.getByText('Restricted Mode').first().waitFor({ state: 'visible', timeout: 60000 });
        return {};
    });
    await step('untrusted_ready', async () => {
        const label = await waitStatus(page, /^sdsat-lsp: (ready|error)/, config.readyTimeoutMs);
        await screenshot(page, 'untrusted');
        return { label };
    });
}

/** The user-facing scenario: missing command -> model error -> ready -> ghost text -> disable/enable -> crash. */
async function mainScenario() {
    // Every status label from here on, to check that $/progress reached the status bar.
    const recorder = setInterval(async () => {
        const label = await statusLabel(page);
        if (label && result.statusLabels[result.statusLabels.length - 1] !== label) {
            result.statusLabels.push(label);
        }
    }, 100);

    await step('missing_command', async () => {
        const { message, buttons } = await waitNotification(page, /was not found/, 60000);
        const label = await waitStatus(page, /error/, 10000);
        await screenshot(page, 'missing-command');
        await clearNotifications(page);
        return { message, buttons, label };
    });

    await step('model_error', async () => {
        writeSettings(config.modelErrorSettings);
        const label = await waitStatus(page, /^sdsat-lsp: error.*no\/such\/model/, config.readyTimeoutMs);
        const { message, buttons } = await waitNotification(page, /no\/such\/model/, 30000);
        await screenshot(page, 'model-error');
        await clearNotifications(page);
        return { message, buttons, label };
    });

    const ready = await step('ready', async () => {
        writeSettings(config.goodSettings);
        const label = await waitStatus(page, /^sdsat-lsp: ready/, config.readyTimeoutMs);
        return { label };
    });

    await step('ghost_text', async () => {
        if (!ready) throw new Error('the server never became ready');
        await openFile(page, config.file);
        const editor = page.locator('.monaco-editor .view-lines').first();
        await editor.waitFor({ timeout: 20000 });
        await editor.click();
        await page.keyboard.press('Control+End');
        let typed = '';
        let ghost = '';
        const attempts = [];
        for (const chunk of config.typing) {
            await page.keyboard.type(chunk, { delay: 25 });
            typed += chunk;
            ghost = await waitGhost(page, config.ghostWaitMs);
            attempts.push({ typed: chunk, ghost });
            log(`typed ${JSON.stringify(chunk)} -> ghost ${JSON.stringify(ghost)}`);
            if (ghost.trim()) break;
        }
        if (!ghost.trim()) {
            await screenshot(page, 'no-ghost-text');
            throw new Error(`no ghost text after typing ${JSON.stringify(typed)}`);
        }
        const shot = await screenshot(page, 'ghost-text');
        // Tab indents instead of accepting when the suggestion starts with more indentation than
        // the line has: the same suggestion stays, less that whitespace, and the next Tab accepts.
        // Any other ghost text after a Tab is a new suggestion, not to be accepted too.
        let tabs = 0;
        let shown = ghost;
        while (tabs < 4) {
            await page.keyboard.press('Tab');
            tabs += 1;
            await sleep(400);
            const now = await ghostText(page);
            if (!(now.trim() && now.length < shown.length && now.trimStart() === shown.trimStart())) break;
            shown = now;
        }
        await page.keyboard.press('Control+s');
        await sleep(1500);
        await screenshot(page, 'accepted');
        return { typed, ghost, attempts, tabs, screenshot: shot };
    });

    await step('disable_enable', async () => {
        await runCommand(page, 'sdsat: Disable inline completion');
        const disabled = await waitStatus(page, /disabled/, 10000);
        await runCommand(page, 'sdsat: Enable inline completion');
        const enabled = await waitStatus(page, /^sdsat-lsp: ready/, 10000);
        return { disabled, enabled };
    });

    await step('crash', async () => {
        const pids = serverPids();
        if (pids.length === 0) throw new Error('no sdsat-lsp server process under code-server');
        for (const pid of pids) process.kill(pid, 'SIGKILL');
        log(`killed ${pids}`);
        const { toast, message, buttons } = await waitNotification(page, /stopped unexpectedly/, 30000);
        const label = await waitStatus(page, /stopped/, 10000);
        await screenshot(page, 'crash');
        await toast.locator('.monaco-button').filter({ hasText: 'Restart' }).first().click();
        const restarted = await waitStatus(page, /^sdsat-lsp: ready/, config.readyTimeoutMs);
        const newPids = serverPids();
        return { killed: pids, message, buttons, label, restarted, newPids };
    });

    clearInterval(recorder);
}

try {
    await step('open', async () => {
        await page.goto(config.url, { waitUntil: 'domcontentloaded', timeout: 60000 });
        await page.locator('.monaco-workbench').waitFor({ timeout: 90000 });
        // The extension activates on startup finished; its status item is the sign.
        const label = await waitStatus(page, /./, 90000);
        return { label };
    });

    await (config.scenario === 'untrusted' ? untrustedScenario() : mainScenario());
} finally {
    save();
    await browser.close();
}
