--- Ghost text for Neovim 0.11, which has no vim.lsp.inline_completion.
---
--- Per buffer: after the last keystroke in insert mode (TextChangedI/CursorMovedI) and a debounce,
--- send textDocument/inlineCompletion; the request it supersedes is cancelled at once (its answer
--- would be for text that no longer exists, and the server would keep decoding for it). The first
--- item is shown as an extmark: its first line as inline virtual text at the cursor, the others as
--- virtual lines. Typing the suggestion's next characters keeps the rest of it on screen; any
--- other edit or cursor move hides it and asks again.

local M = {}

local api = vim.api
local ns = api.nvim_create_namespace('sdsat.ghost')
local INLINE_METHOD = 'textDocument/inlineCompletion'
M.namespace = ns

--- bufnr -> { client_id, debounce_ms, timer, request_id, ghost, augroup }
--- ghost = { row, col, end_row, end_col, text, prefix, extmark } (0-based rows, byte columns)
local buffers = {}

--- What happened to the requests so far (shown by :SdsatStatus; tests read it too).
M.counters = { requested = 0, cancelled = 0, answered = 0, stale = 0, empty = 0, shown = 0 }

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == 'i'
end

local function cancel_request(b)
  if b.request_id then
    local client = vim.lsp.get_client_by_id(b.client_id)
    if client then
      client:cancel_request(b.request_id)
    end
    b.request_id = nil
    M.counters.cancelled = M.counters.cancelled + 1
  end
end

local function hide(bufnr)
  local b = buffers[bufnr]
  if b and b.ghost then
    pcall(api.nvim_buf_del_extmark, bufnr, ns, b.ghost.extmark)
    b.ghost = nil
  end
end

local function display(s)
  -- virtual text shows a tab as a control character, not as the indent it will become
  return (s:gsub('\t', string.rep(' ', vim.bo.tabstop)))
end

local function draw(bufnr, ghost)
  local lines = vim.split(ghost.text, '\n', { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { display(lines[i]), 'SdsatGhost' } }
  end
  local mark = { virt_text_pos = 'inline', hl_mode = 'combine' }
  if lines[1] ~= '' then
    mark.virt_text = { { display(lines[1]), 'SdsatGhost' } }
  end
  if #virt_lines > 0 then
    mark.virt_lines = virt_lines
  end
  ghost.extmark = api.nvim_buf_set_extmark(bufnr, ns, ghost.row, ghost.col, mark)
end

local function line_at(bufnr, row)
  return api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
end

--- The first usable item of an answer, as a ghost at the cursor, or nil.
local function ghost_from(result, bufnr, client, row, col)
  local items = type(result) == 'table' and (result.items or result) or {}
  local line = line_at(bufnr, row)
  for _, item in ipairs(items) do
    local text = item.insertText
    if type(text) == 'table' then
      text = text.value -- a snippet: shown and inserted as its plain text
    end
    local start_col, end_row, end_col = col, row, col
    if type(item.range) == 'table' then
      local s, e = item.range.start, item.range['end']
      if s.line ~= row or e.line ~= row then
        text = nil -- a range off the cursor's line is not a completion at the cursor
      else
        start_col = vim.str_byteindex(line, client.offset_encoding, s.character, false)
        end_col = vim.str_byteindex(line, client.offset_encoding, e.character, false)
      end
    end
    if type(text) == 'string' and start_col <= col and end_col >= col then
      -- An item may repeat what was typed since its range starts (the LSP allows it): show only
      -- what comes after the cursor.
      local typed = line:sub(start_col + 1, col)
      if text:sub(1, #typed) == typed then
        text = text:sub(#typed + 1)
        if text ~= '' then
          return { row = row, col = col, end_row = end_row, end_col = end_col, text = text, prefix = line:sub(1, col) }
        end
      end
    end
  end
  return nil
end

local function request(bufnr)
  local b = buffers[bufnr]
  if not b or api.nvim_get_current_buf() ~= bufnr or not in_insert_mode() then
    return
  end
  local client = vim.lsp.get_client_by_id(b.client_id)
  if not client or client:is_stopped() then
    return
  end
  cancel_request(b)
  local win = api.nvim_get_current_win()
  local cursor = api.nvim_win_get_cursor(win)
  local row, col = cursor[1] - 1, cursor[2]
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = 2 } -- Automatic: the user did not ask
  local request_id
  local ok, id = client:request(INLINE_METHOD, params, function(err, result)
    if b.request_id ~= request_id then
      return -- superseded or cancelled
    end
    b.request_id = nil
    M.counters.answered = M.counters.answered + 1
    if err or result == nil or buffers[bufnr] ~= b then
      return
    end
    local now = api.nvim_win_get_cursor(0)
    if
      api.nvim_get_current_buf() ~= bufnr
      or api.nvim_buf_get_changedtick(bufnr) ~= tick
      or now[1] - 1 ~= row
      or now[2] ~= col
      or not in_insert_mode()
    then
      M.counters.stale = M.counters.stale + 1
      return -- the text or the cursor moved on while the server worked
    end
    b.answered_tick = tick
    local ghost = ghost_from(result, bufnr, client, row, col)
    hide(bufnr)
    if ghost then
      draw(bufnr, ghost)
      b.ghost = ghost
      M.counters.shown = M.counters.shown + 1
    else
      M.counters.empty = M.counters.empty + 1
    end
  end, bufnr)
  if ok then
    request_id = id
    b.request_id = id
    M.counters.requested = M.counters.requested + 1
  end
end

--- After an edit or a cursor move: keep what is left of the ghost when the user typed its next
--- characters, else hide it and ask again after the debounce.
local function on_change(bufnr)
  local b = buffers[bufnr]
  if not b then
    return
  end
  local g = b.ghost
  if g then
    local cursor = api.nvim_win_get_cursor(0)
    local row, col = cursor[1] - 1, cursor[2]
    if row == g.row and col == g.col and line_at(bufnr, row):sub(1, col) == g.prefix then
      return -- nothing that concerns the ghost changed (CursorMovedI after TextChangedI)
    end
    if row == g.row and col > g.col then
      local line = line_at(bufnr, row)
      local typed = line:sub(g.col + 1, col)
      local first = vim.split(g.text, '\n', { plain = true })[1]
      if line:sub(1, g.col) == g.prefix and #typed < #first and first:sub(1, #typed) == typed then
        hide(bufnr)
        local rest = { row = row, col = col, end_row = g.end_row, end_col = g.end_col + #typed,
                       text = g.text:sub(#typed + 1), prefix = line:sub(1, col) }
        draw(bufnr, rest)
        b.ghost = rest
        cancel_request(b)
        if b.timer then
          b.timer:stop()
        end
        return
      end
    end
  end
  hide(bufnr)
  cancel_request(b)
  b.timer:stop()
  b.timer:start(b.debounce_ms, 0, vim.schedule_wrap(function()
    request(bufnr)
  end))
end

local function stop(bufnr)
  local b = buffers[bufnr]
  if not b then
    return
  end
  hide(bufnr)
  cancel_request(b)
  if b.timer then
    b.timer:stop()
  end
end

--- Show ghost text in `bufnr` from client `client_id`.
function M.attach(bufnr, client_id, opts)
  local b = buffers[bufnr]
  if b then
    b.client_id = client_id
    return
  end
  b = { client_id = client_id, debounce_ms = opts.debounce_ms or 150, timer = vim.uv.new_timer() }
  b.augroup = api.nvim_create_augroup('sdsat.ghost.' .. bufnr, { clear = true })
  buffers[bufnr] = b
  api.nvim_create_autocmd({ 'TextChangedI', 'CursorMovedI' }, {
    group = b.augroup,
    buffer = bufnr,
    callback = function()
      on_change(bufnr)
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = b.augroup,
    buffer = bufnr,
    callback = function()
      stop(bufnr)
    end,
  })
  api.nvim_create_autocmd({ 'BufWipeout' }, {
    group = b.augroup,
    buffer = bufnr,
    callback = function()
      M.detach(bufnr)
    end,
  })
end

function M.detach(bufnr)
  local b = buffers[bufnr]
  if not b then
    return
  end
  stop(bufnr)
  b.timer:close()
  pcall(api.nvim_del_augroup_by_id, b.augroup)
  buffers[bufnr] = nil
end

--- Detach every buffer served by `client_id` (the server went away).
function M.detach_client(client_id)
  for bufnr, b in pairs(buffers) do
    if b.client_id == client_id then
      M.detach(bufnr)
    end
  end
end

function M.detach_all()
  for bufnr in pairs(buffers) do
    M.detach(bufnr)
  end
end

--- Whether the server has answered for the text as it is now (with ghost text or without).
function M.answered(bufnr)
  local b = buffers[bufnr]
  return b ~= nil and b.answered_tick == api.nvim_buf_get_changedtick(bufnr)
end

--- The ghost text shown in `bufnr`, or nil.
function M.current(bufnr)
  local b = buffers[bufnr]
  return b and b.ghost and b.ghost.text or nil
end

--- Insert the ghost text (replacing the range the server gave) and put the cursor after it.
function M.accept(bufnr)
  local b = buffers[bufnr]
  local g = b and b.ghost
  if not g then
    return false
  end
  hide(bufnr)
  cancel_request(b)
  local lines = vim.split(g.text, '\n', { plain = true })
  api.nvim_buf_set_text(bufnr, g.row, g.col, g.end_row, g.end_col, lines)
  local last = g.row + #lines - 1
  local col = (#lines == 1 and g.col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { last + 1, col })
  return true
end

--- Hide the ghost text without asking again until the next edit.
function M.dismiss(bufnr)
  local b = buffers[bufnr]
  if not b or not b.ghost then
    return false
  end
  stop(bufnr)
  return true
end

return M
