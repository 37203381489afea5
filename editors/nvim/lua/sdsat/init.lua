--- sdsat-lsp for Neovim >= 0.11.
---
--- Starts `sdsat-lsp --stdio` through vim.lsp.config/vim.lsp.enable, shows its inline completions
--- (Neovim's own vim.lsp.inline_completion on 0.12+, this plugin's ghost text on 0.11) and turns the
--- server's state into messages a user can act on: a missing executable, a model that fails to load,
--- a server that dies.
---
---   require('sdsat').setup({ settings = { maxTokens = 48 } })
---   vim.o.statusline = "%f %=%{v:lua.require'sdsat'.status()}"

local M = {}

local NAME = 'sdsat'
local STATUS_METHOD = 'sdsat/status'
local INLINE_METHOD = 'textDocument/inlineCompletion'
local levels = vim.log.levels

--- Options of setup(); `settings` go to the server unchanged (camelCase, see the README).
M.defaults = {
  cmd = { 'sdsat-lsp', '--stdio' },
  filetypes = nil, -- nil: every filetype
  root_markers = { '.git', 'pyproject.toml', 'setup.py', 'package.json', 'Cargo.toml', 'go.mod' },
  settings = {}, -- model, quantize, device, k, mode, maxTokens, timeBudgetMs, lineMode, ...
  enabled = true, -- start the server from setup()
  inline = 'auto', -- 'auto' (built-in on 0.12+, else the plugin's) | 'builtin' | 'plugin'
  debounce_ms = 150, -- the plugin's ghost text: wait this long after the last keystroke
  keys = { accept = '<Tab>', dismiss = '<C-]>' }, -- insert-mode keys; false: no mapping
}

M.opts = vim.deepcopy(M.defaults)

-- What status() shows. One server serves every buffer, so one state is enough.
local current = { state = 'off', message = '', percentage = nil, progress = nil, client_id = nil }
-- Clients that we stopped ourselves: their exit is not a crash.
local expected_exit = {}
local leaving = false
local last_error = nil

local function notify(message, level)
  vim.notify('sdsat-lsp: ' .. message, level or levels.INFO, { title = 'sdsat-lsp' })
end

local function set_state(state, message, client_id)
  current.state = state
  current.message = message or ''
  if client_id then
    current.client_id = client_id
  end
  if state ~= 'loading' then
    current.percentage, current.progress = nil, nil
  end
  vim.cmd('redrawstatus')
  vim.api.nvim_exec_autocmds('User', { pattern = 'SdsatStatus', modeline = false, data = M.state() })
end

--- A copy of the server's state: { state, message, percentage, progress, client_id }.
--- state: off | starting | loading | ready | error | crashed | disabled | missing
function M.state()
  return vim.deepcopy(current)
end

--- A short text for a statusline: "" while off, else "sdsat: loading 50%", "sdsat: ready", ...
function M.status()
  local s = current.state
  if s == 'off' then
    return ''
  end
  if s == 'loading' and current.percentage then
    return ('sdsat: loading %d%%'):format(current.percentage)
  end
  return 'sdsat: ' .. s
end

local function use_builtin()
  if M.opts.inline == 'builtin' then
    return true
  end
  return M.opts.inline == 'auto' and vim.fn.has('nvim-0.12') == 1 and vim.lsp.inline_completion ~= nil
end

--- The executable is checked here because Neovim 0.11 only writes "not executable" to its LSP log
--- and starts nothing: the user would see no completions and no reason.
local function check_cmd()
  local cmd = M.opts.cmd
  if type(cmd) ~= 'table' or vim.fn.executable(cmd[1]) == 1 then
    return true
  end
  set_state('missing', cmd[1] .. ' not found')
  notify(
    ('cannot start the server: `%s` is not an executable on this machine.\n'):format(cmd[1])
      .. 'Fix: install it with `pip install sdsat-lsp` (into a Python whose scripts are on $PATH), '
      .. "or set the command: require('sdsat').setup({ cmd = { '/path/to/sdsat-lsp', '--stdio' } })",
    levels.ERROR
  )
  return false
end

-- ---------------------------------------------------------------------------------------------
-- Handlers for what the server sends.

local function on_status(_, params, ctx)
  if type(params) ~= 'table' then
    return
  end
  local state, message = params.state or 'loading', params.message or ''
  set_state(state, message, ctx.client_id)
  if state == 'error' then
    last_error = message
    notify(
      ('the model failed to load: %s\n'):format(message)
        .. "Fix: check the model settings (require('sdsat').setup({ settings = { model = ... } })), "
        .. 'then run :SdsatRestart.',
      levels.ERROR
    )
  end
end

--- The server also reports a failed load with window/showMessage; the status notification above
--- already said it, with the fix, so the same text is not shown twice.
local function on_show_message(err, params, ctx)
  if
    type(params) == 'table'
    and params.type == vim.lsp.protocol.MessageType.Error
    and last_error
    and params.message:find(last_error, 1, true)
  then
    return
  end
  return vim.lsp.handlers['window/showMessage'](err, params, ctx)
end

local function on_exit(code, signal, client_id)
  -- on_exit runs in a libuv callback, where vim.notify and the state's autocmds are not allowed.
  vim.schedule(function()
    local expected = expected_exit[client_id] or leaving
    expected_exit[client_id] = nil
    if current.client_id ~= nil and current.client_id ~= client_id then
      return -- an older server; the current one is still running
    end
    require('sdsat.ghost').detach_client(client_id)
    if expected then
      if current.state ~= 'disabled' and current.state ~= 'starting' then
        set_state('off', '')
      end
      return
    end
    if code ~= 0 or signal ~= 0 then
      local how = signal ~= 0 and ('signal %d'):format(signal) or ('exit code %d'):format(code)
      set_state('crashed', 'the server stopped (' .. how .. ')')
      notify(
        ('the server stopped unexpectedly (%s). Run :SdsatRestart to start it again; '):format(how)
          .. 'its log is in '
          .. vim.lsp.get_log_path(),
        levels.ERROR
      )
    else
      set_state('off', '')
    end
  end)
end

local function non_empty(t)
  return (type(t) == 'table' and next(t) ~= nil) and t or nil
end

--- The vim.lsp.config entry. Empty settings are left out because Lua encodes {} as a JSON array,
--- which the server rightly rejects as settings.
--- The server process, spawned from setup()'s `cmd` alone. vim.lsp.enable() resolves a config by
--- merging vim.lsp.config('*'), every `lsp/sdsat.lua` on 'runtimepath' and ours: a table `cmd` there
--- would be merged index by index with ours (extra arguments) and a `cmd_env` or `cmd_cwd` would
--- pass through (a PATH that finds another `sdsat-lsp`). A function is taken whole, so nothing a
--- project can put on the runtimepath chooses what runs. PYTHONSAFEPATH keeps `python -m` from
--- importing modules from the project folder it starts in.
local function spawn(dispatchers)
  return vim.lsp.rpc.start(M.opts.cmd, dispatchers, { env = { PYTHONSAFEPATH = '1' } })
end

local function client_config()
  local settings = non_empty(M.opts.settings)
  return {
    cmd = type(M.opts.cmd) == 'table' and spawn or M.opts.cmd,
    filetypes = M.opts.filetypes,
    root_markers = M.opts.root_markers,
    init_options = settings,
    settings = settings and { sdsat = settings } or nil,
    -- 0.11 does not declare inline completion; without it the server would also offer popup
    -- completions (its fallback for clients without inline completion).
    capabilities = { textDocument = { inlineCompletion = { dynamicRegistration = false } } },
    -- One server for every project: each server process holds a model in memory.
    reuse_client = function(client, config)
      return client.name == config.name and not client:is_stopped()
    end,
    handlers = { [STATUS_METHOD] = on_status, ['window/showMessage'] = on_show_message },
    -- Not at enable(): a server starts only with the first buffer it applies to.
    before_init = function()
      set_state('starting', 'starting ' .. (type(M.opts.cmd) == 'table' and M.opts.cmd[1] or 'the server'))
    end,
    on_init = function(client)
      current.client_id = client.id
    end,
    on_exit = on_exit,
  }
end

-- ---------------------------------------------------------------------------------------------
-- Keys and buffers.

--- Accept the suggestion shown in the current buffer; true when there was one.
function M.accept()
  if use_builtin() then
    return vim.lsp.inline_completion.get({ bufnr = 0 }) and true or false
  end
  return require('sdsat.ghost').accept(vim.api.nvim_get_current_buf())
end

--- Hide the plugin's ghost text; true when some was shown.
function M.dismiss()
  if use_builtin() then
    return false -- the built-in hides its suggestion itself when the cursor moves
  end
  return require('sdsat.ghost').dismiss(vim.api.nvim_get_current_buf())
end

local function map_key(bufnr, lhs, action, desc)
  if not lhs then
    return
  end
  -- A Lua callback (not an <expr> mapping) because accepting edits the buffer, which expr
  -- mappings may not do; without a suggestion the key does what it does unmapped.
  vim.keymap.set('i', lhs, function()
    if not action() then
      vim.api.nvim_feedkeys(vim.keycode(lhs), 'ni', false)
    end
  end, { buffer = bufnr, desc = desc })
end

local function on_attach(client, bufnr)
  if use_builtin() then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
  else
    require('sdsat.ghost').attach(bufnr, client.id, { debounce_ms = M.opts.debounce_ms })
  end
  map_key(bufnr, M.opts.keys.accept, M.accept, 'sdsat: accept the suggestion')
  if not use_builtin() then
    map_key(bufnr, M.opts.keys.dismiss, M.dismiss, 'sdsat: dismiss the suggestion')
  end
end

local function on_detach(bufnr)
  require('sdsat.ghost').detach(bufnr)
  for _, lhs in ipairs({ M.opts.keys.accept, M.opts.keys.dismiss }) do
    if lhs then
      pcall(vim.keymap.del, 'i', lhs, { buffer = bufnr })
    end
  end
end

-- ---------------------------------------------------------------------------------------------
-- Starting and stopping.

local function our_clients()
  return vim.lsp.get_clients({ name = NAME, _uninitialized = true })
end

--- Start the server for every buffer it applies to (the executable is checked first).
function M.enable()
  if not check_cmd() then
    return false
  end
  -- Assigning (not calling vim.lsp.config()) replaces the entry: calling it deep-merges lists,
  -- so a shorter cmd would keep the old one's tail.
  vim.lsp.config[NAME] = client_config()
  vim.lsp.enable(NAME)
  return true
end

local function stop_all()
  local clients = our_clients()
  for _, client in ipairs(clients) do
    expected_exit[client.id] = true
  end
  vim.lsp.enable(NAME, false) -- stops the clients too
  -- Wait for the old process, so that the next start does not reuse a client on its way out.
  if not vim.wait(3000, function()
    return #our_clients() == 0
  end, 20) then
    for _, client in ipairs(our_clients()) do
      client:stop(true)
    end
    vim.wait(2000, function()
      return #our_clients() == 0
    end, 20)
  end
  require('sdsat.ghost').detach_all()
end

--- Stop the server and do not start it for new buffers.
function M.disable()
  stop_all()
  set_state('disabled', 'disabled with :SdsatDisable')
end

--- Stop the server (if it runs) and start a fresh one.
function M.restart()
  if not check_cmd() then
    return false
  end
  stop_all()
  current.client_id = nil
  return M.enable()
end

--- Change server settings at run time (model settings reload the model).
function M.configure(settings)
  M.opts.settings = vim.tbl_deep_extend('force', M.opts.settings, settings or {})
  vim.lsp.config[NAME] = client_config()
  for _, client in ipairs(our_clients()) do
    client.settings = { sdsat = M.opts.settings }
    client:notify('workspace/didChangeConfiguration', { settings = client.settings })
  end
end

local function show_status()
  local lines = { ('state: %s%s'):format(current.state, current.message ~= '' and (' (' .. current.message .. ')') or '') }
  if current.progress then
    lines[#lines + 1] = 'progress: ' .. current.progress
  end
  lines[#lines + 1] = 'command: ' .. (type(M.opts.cmd) == 'table' and table.concat(M.opts.cmd, ' ') or '<function>')
  if use_builtin() then
    lines[#lines + 1] = 'suggestions: vim.lsp.inline_completion (built-in)'
  else
    local c = require('sdsat.ghost').counters
    lines[#lines + 1] = ('suggestions: ghost text; requests %d, shown %d, empty %d, cancelled %d, stale %d'):format(
      c.requested, c.shown, c.empty, c.cancelled, c.stale)
  end
  for _, client in ipairs(our_clients()) do
    local buffers = vim.tbl_keys(client.attached_buffers)
    lines[#lines + 1] = ('client %d: %d buffer(s), root %s'):format(client.id, #buffers, client.root_dir or '-')
  end
  lines[#lines + 1] = 'log: ' .. vim.lsp.get_log_path()
  notify(table.concat(lines, '\n'), current.state == 'error' and levels.WARN or levels.INFO)
end

local group = vim.api.nvim_create_augroup('sdsat', { clear = true })

local function create_autocmds()
  vim.api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME and client:supports_method(INLINE_METHOD) then
        on_attach(client, args.buf)
      end
    end,
  })
  vim.api.nvim_create_autocmd('LspDetach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME then
        on_detach(args.buf)
      end
    end,
  })
  vim.api.nvim_create_autocmd('LspProgress', {
    group = group,
    callback = function(args)
      local data = args.data or {}
      local client = vim.lsp.get_client_by_id(data.client_id)
      local value = data.params and data.params.value
      if not client or client.name ~= NAME or type(value) ~= 'table' then
        return
      end
      if value.kind == 'end' then
        current.percentage, current.progress = nil, nil
      else
        current.percentage = value.percentage or current.percentage
        current.progress = value.message or value.title or current.progress
      end
      vim.cmd('redrawstatus')
    end,
  })
  vim.api.nvim_create_autocmd('VimLeavePre', {
    group = group,
    callback = function()
      leaving = true
    end,
  })
end

local function create_commands()
  local command = vim.api.nvim_create_user_command
  command('SdsatRestart', M.restart, { desc = 'sdsat-lsp: restart the server' })
  command('SdsatEnable', M.enable, { desc = 'sdsat-lsp: start the server' })
  command('SdsatDisable', M.disable, { desc = 'sdsat-lsp: stop the server' })
  command('SdsatStatus', show_status, { desc = 'sdsat-lsp: show the server state' })
end

--- setup({ cmd, filetypes, root_markers, settings, enabled, inline, debounce_ms, keys })
function M.setup(opts)
  if vim.fn.has('nvim-0.11') == 0 then
    notify('needs Neovim 0.11 or newer (vim.lsp.config and vim.lsp.enable)', levels.ERROR)
    return
  end
  M.opts = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  if opts and opts.cmd then
    M.opts.cmd = opts.cmd -- a list replaces the default, it is not merged with it
  end
  vim.api.nvim_set_hl(0, 'SdsatGhost', { link = 'Comment', default = true })
  create_autocmds()
  create_commands()
  if M.opts.enabled then
    M.enable()
  end
end

return M
