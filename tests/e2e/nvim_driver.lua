-- Drives a headless Neovim through one scenario of tests/e2e/test_nvim.py, as a user would: the
-- keys go through nvim_input, so insert mode, TextChangedI and the plugin's mappings run exactly as
-- when typed. The steps run in a coroutine resumed by timers, so that Neovim's main loop (keys, LSP
-- messages, autocmds) runs between them. Everything observed is written to a JSON file, then
-- Neovim quits; the Python side makes the assertions.
--
-- Input: the JSON file named by $SDSAT_E2E_CONFIG:
--   { scenario, result, file, cmd, settings, typing = [chunks], ghost_wait_ms, ready_timeout_ms }

local api = vim.api
-- Python's ftplugin asks has('python3'), which probes for a Python provider for seconds.
vim.g.loaded_python3_provider = 0
local cfg = vim.json.decode(assert(io.open(os.getenv('SDSAT_E2E_CONFIG'))):read('*a'))
local out = { scenario = cfg.scenario, notifications = {}, states = {}, statuses = {}, steps = {} }
local started = vim.uv.hrtime()

local function now()
  return (vim.uv.hrtime() - started) / 1e9
end

local function step(fmt, ...)
  local line = ('%6.2f %s'):format(now(), fmt:format(...))
  out.steps[#out.steps + 1] = line
  io.stderr:write(line .. '\n')
end

vim.notify = function(message, level)
  out.notifications[#out.notifications + 1] = { message = message, level = level or vim.log.levels.INFO, t = now() }
  step('notify[%s] %s', tostring(level), message)
end

api.nvim_create_autocmd('User', {
  pattern = 'SdsatStatus',
  callback = function(args)
    local d = args.data or {}
    out.states[#out.states + 1] = { state = d.state, message = d.message, t = now() }
    step('state %s: %s', tostring(d.state), tostring(d.message))
  end,
})

-- The statusline text as a user would see it over time (it changes on progress too).
local function record_status()
  local ok, sdsat = pcall(require, 'sdsat')
  local text = ok and sdsat.status() or ''
  if out.statuses[#out.statuses] ~= text then
    out.statuses[#out.statuses + 1] = text
  end
end
local poll = vim.uv.new_timer()
poll:start(0, 50, vim.schedule_wrap(record_status))

local finished = false
local function finish(err)
  if finished then
    return
  end
  finished = true
  record_status() -- the poll may not have run since the last change
  out.error = err
  out.seconds = now()
  local f = assert(io.open(cfg.result, 'w'))
  f:write(vim.json.encode(out))
  f:close()
  vim.cmd('qa!')
end

local main
local function resume(...)
  local ok, err = coroutine.resume(main, ...)
  if not ok then
    finish(debug.traceback(main, err))
  elseif coroutine.status(main) == 'dead' then
    finish(nil)
  end
end

local function sleep(ms)
  vim.defer_fn(resume, ms)
  coroutine.yield()
end

local function wait_for(what, timeout_ms, predicate)
  local deadline = now() + timeout_ms / 1000
  while not predicate() do
    if now() > deadline then
      error(('timed out after %d ms waiting for %s'):format(timeout_ms, what), 0)
    end
    sleep(50)
  end
end

local function state()
  return require('sdsat').state().state
end

local function wait_ready()
  wait_for('the server to be ready', cfg.ready_timeout_ms, function()
    local s = state()
    if s == 'error' or s == 'crashed' then
      error('the server reported ' .. s .. ': ' .. require('sdsat').state().message, 0)
    end
    return s == 'ready'
  end)
  step('ready')
end

local function server_pids()
  local pids = {}
  for _, pid in ipairs(api.nvim_get_proc_children(vim.fn.getpid())) do
    pids[#pids + 1] = pid
  end
  return pids
end

--- Type `text` a key at a time; "<BS>" in it is the Backspace key.
local function type_text(text)
  local i = 1
  while i <= #text do
    local key = text:sub(i, i)
    if text:sub(i, i + 3) == '<BS>' then
      key, i = '<BS>', i + 3
    elseif key == '<' then
      key = '<lt>'
    end
    api.nvim_input(key)
    i = i + 1
    sleep(cfg.key_delay_ms or 30)
  end
end

--- What the user sees of the ghost text: the extmarks' virtual text, virtual lines below.
local function shown_ghost(bufnr)
  local ns = require('sdsat.ghost').namespace
  local marks = api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local d = marks[1][4]
  local parts = {}
  for _, chunk in ipairs(d.virt_text or {}) do
    parts[#parts + 1] = chunk[1]
  end
  local text = table.concat(parts)
  for _, line in ipairs(d.virt_lines or {}) do
    local cols = {}
    for _, chunk in ipairs(line) do
      cols[#cols + 1] = chunk[1]
    end
    text = text .. '\n' .. table.concat(cols)
  end
  return { text = text, row = marks[1][2], col = marks[1][3], count = #marks }
end

local function open_file()
  vim.cmd.edit(vim.fn.fnameescape(cfg.file))
  -- Typed indentation stays as typed (the Python indent script would add its own).
  vim.bo.autoindent, vim.bo.smartindent, vim.bo.indentexpr = false, false, ''
  step('opened %s (filetype %s)', cfg.file, vim.bo.filetype)
end

local scenarios = {}

--- Type `chunks` one at a time until ghost text shows (the model may have nothing to say at a
--- given spot: then the next chunk is typed); returns it and the index of the chunk after which
--- it showed. A slow answer is waited for (up to ghost_wait_ms), not typed over.
local function type_until_ghost(bufnr, chunks)
  local plugin = require('sdsat.ghost')
  for i, chunk in ipairs(chunks) do
    type_text(chunk)
    step('typed chunk %d %q', i, chunk)
    local ok = pcall(wait_for, 'an answer', cfg.ghost_wait_ms, function()
      return shown_ghost(bufnr) ~= nil or plugin.answered(bufnr)
    end)
    local ghost = shown_ghost(bufnr)
    step('chunk %d: %s', i, ghost and ('ghost %q'):format(ghost.text) or (ok and 'empty answer' or 'no answer'))
    if ghost and ghost.text ~= '' then
      sleep(300) -- let a late answer land now rather than during the next step
      out.counters = vim.deepcopy(require('sdsat.ghost').counters)
      return shown_ghost(bufnr), i
    end
  end
  -- Say why: what the plugin sent and got, and what the server did with each request.
  local client = vim.lsp.get_clients({ name = 'sdsat' })[1]
  local stats = client and client:request_sync('sdsat/stats', { last = 30 }, 10000, bufnr)
  error(('no ghost text appeared after typing %s\nplugin: %s\nserver: %s'):format(
    vim.inspect(chunks), vim.inspect(require('sdsat.ghost').counters),
    vim.inspect(stats and stats.result and stats.result.requests)), 0)
end

local function press(key, what, predicate)
  api.nvim_input(key)
  wait_for(what, 2000, predicate)
end

function scenarios.ghost()
  require('sdsat').setup({ cmd = cfg.cmd, settings = cfg.settings, debounce_ms = 100 })
  open_file()
  vim.bo.expandtab, vim.bo.shiftwidth, vim.bo.softtabstop = true, 4, 4
  wait_ready()
  local bufnr = api.nvim_get_current_buf()
  press('Go', 'insert mode', function()
    return api.nvim_get_mode().mode == 'i'
  end)

  -- Without a suggestion, <Tab> is an ordinary Tab (here: four spaces).
  out.ghost_before_tab = require('sdsat.ghost').current(bufnr) or vim.NIL
  press('<Tab>', 'a plain Tab', function()
    return api.nvim_get_current_line() ~= ''
  end)
  out.line_after_plain_tab = api.nvim_get_current_line()

  -- <C-]> hides a suggestion and leaves the text alone.
  local ghost, n = type_until_ghost(bufnr, cfg.typing)
  local tick = api.nvim_buf_get_changedtick(bufnr)
  out.dismissed = ghost.text
  press('<C-]>', 'the ghost text to go', function()
    return shown_ghost(bufnr) == nil
  end)
  sleep(500) -- and no new request brings it back before the next keystroke
  out.after_dismiss = { shown = shown_ghost(bufnr) ~= nil, changed = api.nvim_buf_get_changedtick(bufnr) ~= tick }

  -- The suggestion again (a space typed and erased asks for the same spot), then <Tab> takes it.
  local rest = { ' <BS>' }
  vim.list_extend(rest, cfg.typing, n + 1)
  ghost = type_until_ghost(bufnr, rest)
  out.ghost = ghost
  out.ghost_plugin = require('sdsat.ghost').current(bufnr)
  out.before = api.nvim_buf_get_lines(bufnr, 0, -1, false)
  out.cursor_before = api.nvim_win_get_cursor(0)
  step('ghost %q at %d:%d', ghost.text, ghost.row, ghost.col)
  tick = api.nvim_buf_get_changedtick(bufnr)
  press('<Tab>', 'the buffer to change after <Tab>', function()
    return api.nvim_buf_get_changedtick(bufnr) ~= tick
  end)
  out.after = api.nvim_buf_get_lines(bufnr, 0, -1, false)
  out.cursor_after = api.nvim_win_get_cursor(0)
  out.mode_after = api.nvim_get_mode().mode
  press('<Esc>', 'normal mode', function()
    return api.nvim_get_mode().mode == 'n'
  end)
  vim.cmd('write')
  step('written')
  -- The settings the server runs with (from init_options and workspace/configuration).
  local client = vim.lsp.get_clients({ name = 'sdsat' })[1]
  local stats = client:request_sync('sdsat/stats', { last = 0 }, 30000, bufnr)
  out.server_settings = stats and stats.result and stats.result.settings
end

function scenarios.missing()
  require('sdsat').setup({ cmd = cfg.cmd })
  open_file()
  sleep(1500)
  out.clients = #vim.lsp.get_clients({ name = 'sdsat', _uninitialized = true })
  out.final_state = state()
end

function scenarios.model_error()
  require('sdsat').setup({ cmd = cfg.cmd, settings = cfg.settings })
  open_file()
  wait_for('the error state', cfg.ready_timeout_ms, function()
    return state() == 'error' or state() == 'crashed' -- a crash would never turn into the error
  end)
  sleep(1000) -- a second message about the same failure would come now
  out.final = require('sdsat').state()
end

function scenarios.crash()
  require('sdsat').setup({ cmd = cfg.cmd, settings = cfg.settings })
  open_file()
  wait_ready()
  out.pids_before = server_pids()
  out.client_before = require('sdsat').state().client_id
  step('killing %s', vim.inspect(out.pids_before))
  for _, pid in ipairs(out.pids_before) do
    vim.uv.kill(pid, 'sigkill')
  end
  wait_for('the crash message', 10000, function()
    return state() == 'crashed'
  end)
  sleep(300)
  out.crash_state = require('sdsat').state()
  vim.cmd('SdsatRestart')
  wait_ready()
  out.pids_after = server_pids()
  out.client_after = require('sdsat').state().client_id
  out.attached = #vim.lsp.get_clients({ name = 'sdsat', bufnr = api.nvim_get_current_buf() })
end

main = coroutine.create(function()
  local scenario = assert(scenarios[cfg.scenario], 'unknown scenario ' .. tostring(cfg.scenario))
  scenario()
end)
vim.defer_fn(function()
  finish('the scenario did not finish within ' .. cfg.timeout_ms .. ' ms')
end, cfg.timeout_ms)
vim.schedule(resume)
