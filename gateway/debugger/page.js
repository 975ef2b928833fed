// The gateway's debugger page. Plain JavaScript, served as is: no build step,
// nothing from elsewhere (the page's Content-Security-Policy forbids it).
//
// It reads /debugger/events (an EventSource of JSON records, one per thing
// that happens to a call), polls /debugger/status for the destinations and
// /debugger/dead-letters for the dead letters, and POSTs /debugger/replay.
// Everything that came from a call is put in the page as text, never as HTML.
'use strict'

const MAX_CALLS = 500 // calls kept in the list; the oldest go
const MAX_HELD = 10000 // records kept while paused; past that the oldest go (and are counted)
const STATUS_EVERY = 2000 // ms between looks at /debugger/status
const DEAD_LETTERS_EVERY = 15000 // ms between looks at the dead letters when nothing says they changed
const FILTERS = ['source', 'destination', 'type', 'event', 'userId']
const OUTCOMES = new Set(['delivered', 'retried', 'dead_lettered', 'skipped', 'replayed'])
const SVG = 'http://www.w3.org/2000/svg'

const state = {
  calls: new Map(), // key -> entry
  order: [], // keys, oldest first
  paused: false,
  held: [],
  heldLost: 0,
  dropped: 0,
  nCalls: 0,
  nRejected: 0,
  es: null,
  filters: {},
  seq: 0,
  buffer: null, // records the gateway holds for this page (from the hello record)
  deadSeen: null, // the destinations' dead counts at the last look
  deadDirty: 0, // status polls that still read the dead letters (a dead letter is stored just after it is said)
  deadReadAt: 0,
}

const $ = (id) => document.getElementById(id)

function el (tag, props, ...kids) {
  const e = document.createElement(tag)
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue
    if (k === 'class') e.className = v
    else if (k === 'data') Object.assign(e.dataset, v)
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v)
    else e.setAttribute(k, v === true ? '' : String(v))
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue
    e.append(kid instanceof Node ? kid : String(kid))
  }
  return e
}

function svg (tag, attrs) {
  const e = document.createElementNS(SVG, tag)
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v))
  return e
}

function clock (at) {
  const d = new Date(at * 1000)
  const p = (n, w = 2) => String(n).padStart(w, '0')
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`
}

function ago (seconds) {
  if (seconds == null) return ''
  if (seconds < 1) return 'just now'
  if (seconds < 90) return `${Math.round(seconds)} s ago`
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`
  return `${Math.round(seconds / 3600)} h ago`
}

function duration (seconds) {
  if (seconds == null) return '—'
  if (seconds < 90) return `${Math.round(seconds)} s`
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`
  return `${(seconds / 3600).toFixed(1)} h`
}

function pretty (text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2)
  } catch (e) {
    return text
  }
}

function rate (v) {
  return v >= 10 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2)
}

// -- the stream -------------------------------------------------------------

function setConn (how, text) {
  $('conn').className = `dot ${how}`
  $('conn-text').textContent = text || { live: 'live', connecting: 'connecting…', down: 'disconnected' }[how]
}

function connect () {
  if (state.es) state.es.close()
  const q = new URLSearchParams()
  for (const k of FILTERS) if (state.filters[k]) q.set(k, state.filters[k])
  const qs = q.toString()
  const es = new EventSource('/debugger/events' + (qs ? `?${qs}` : ''))
  state.es = es
  setConn('connecting')
  es.onopen = () => setConn('live', qs ? `live · filtered: ${qs.replaceAll('&', ', ')}` : 'live')
  es.onmessage = (m) => {
    let r
    try {
      r = JSON.parse(m.data)
    } catch (e) {
      return
    }
    onRecord(r)
  }
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      setConn('down')
      setTimeout(() => { if (state.es === es) connect() }, 3000)
    } else {
      setConn('connecting', 'reconnecting…')
    }
  }
}

function onRecord (r) {
  if (r.kind === 'hello') {
    state.buffer = r.buffer
    showProcess(r.process)
    return
  }
  if (r.kind === 'overflow') {
    state.dropped += r.dropped
    addNotice(r)
    counts()
    return
  }
  if (state.paused) {
    if (state.held.length >= MAX_HELD) {
      state.held.shift()
      state.heldLost++
    }
    state.held.push(r)
    counts()
    return
  }
  apply(r)
}

function apply (r) {
  if (r.kind === 'accepted') {
    const entry = entryFor(r)
    entry.kind = 'accepted'
    entry.call = r.call
    entry.truncated = r.truncated
    entry.at = r.at
    render(entry)
  } else if (OUTCOMES.has(r.kind)) {
    const entry = entryFor(r)
    const list = entry.outcomes.get(r.destination) || []
    list.push(r)
    entry.outcomes.set(r.destination, list)
    render(entry)
  } else if (r.kind === 'rejected' || r.kind === 'dropped') {
    addIngestRecord(r)
  }
  counts()
}

// -- the list ---------------------------------------------------------------

function keyOf (r) {
  return r.messageId != null ? `${r.source ?? ''}\u0000${r.messageId}` : `#${++state.seq}`
}

function entryFor (r) {
  const key = keyOf(r)
  let entry = state.calls.get(key)
  if (entry) return entry
  entry = {
    key,
    kind: 'seen', // an outcome came first: accepted before this page was watching
    at: r.at,
    source: r.source,
    type: r.type,
    event: r.event,
    userId: r.userId,
    messageId: r.messageId,
    call: null,
    truncated: null,
    outcomes: new Map(),
  }
  entry.li = el('li', { class: 'call', data: { messageId: r.messageId ?? '', source: r.source ?? '' } })
  entry.li.addEventListener('click', (ev) => {
    if (ev.target.closest('.detail')) return
    entry.li.classList.toggle('open')
    if (entry.li.classList.contains('open')) renderDetail(entry)
  })
  state.nCalls++
  insert(entry)
  return entry
}

function insert (entry) {
  state.calls.set(entry.key, entry)
  state.order.push(entry.key)
  $('calls').prepend(entry.li)
  while (state.order.length > MAX_CALLS) {
    const old = state.calls.get(state.order.shift())
    state.calls.delete(old.key)
    old.li.remove()
  }
  $('empty').hidden = true
}

function chipText (d, r) {
  switch (r.kind) {
    case 'delivered': return `${d} ✓`
    case 'retried': return `${d} ↻ ${r.status ?? r.reason ?? ''}`.trim()
    case 'dead_lettered': return `${d} ✗ ${r.status ?? 'dead'}`
    case 'skipped': return `${d} skipped`
    default: return `${d} ${r.kind}`
  }
}

function render (entry) {
  const chips = [...entry.outcomes].sort(([a], [b]) => a.localeCompare(b)).map(([d, list]) => {
    const last = list[list.length - 1]
    return el('span', {
      class: `chip ${last.kind}`,
      data: { destination: d, kind: last.kind, status: last.status ?? '' },
      title: `${d}: ${last.kind}${last.status ? ` (HTTP ${last.status})` : ''}${last.why || last.reason ? ` — ${last.why || last.reason}` : ''}`,
    }, chipText(d, last))
  })
  const what = el('span', { class: 'what' },
    el('span', { class: 'ev' }, entry.event ?? entry.type ?? 'call'),
    entry.event ? el('span', { class: 'who' }, entry.type) : null,
    entry.userId != null ? el('span', { class: 'who' }, entry.userId) : null,
    entry.messageId != null ? el('span', { class: 'mid' }, entry.messageId) : null)
  const row = el('div', { class: 'row' },
    el('span', { class: 'time' }, clock(entry.at)),
    el('span', { class: `kind ${entry.kind}` }, entry.kind === 'seen' ? 'in flight' : 'accepted'),
    el('span', { class: 'src' }, entry.source ?? ''),
    what,
    el('span', { class: 'outcomes' }, chips))
  const old = entry.li.querySelector(':scope > .row')
  if (old) old.replaceWith(row)
  else entry.li.prepend(row)
  if (entry.li.classList.contains('open')) renderDetail(entry)
}

function renderDetail (entry) {
  const rows = []
  for (const [d, list] of entry.outcomes) {
    for (const r of list) {
      rows.push(el('tr', { data: { destination: d, kind: r.kind } },
        el('td', {}, d),
        el('td', {}, el('span', { class: `chip ${r.kind}` }, r.kind.replace('_', '-'))),
        el('td', {}, r.status ?? ''),
        el('td', {}, r.why || r.reason || '', r.excerpt ? el('div', { class: 'excerpt' }, r.excerpt) : null),
        el('td', {}, r.next_attempt ? `next attempt ${clock(r.next_attempt)}` : ''),
        el('td', { class: 'time' }, clock(r.at))))
    }
  }
  const stored = entry.call != null
    ? [el('pre', { class: 'json' }, pretty(entry.call)),
        entry.truncated ? el('p', { class: 'empty' }, `cut at 16 KiB of ${entry.truncated} bytes`) : null]
    : [el('p', { class: 'empty' }, 'Not seen: the call was accepted before this page started watching.')]
  const detail = el('div', { class: 'detail' },
    el('h3', {}, 'Destinations'),
    rows.length
      ? el('table', {}, el('tr', {}, ['destination', 'outcome', 'status', 'why', '', 'at'].map((h) => el('th', {}, h))), rows)
      : el('p', { class: 'empty' }, 'No destination has reported on it yet.'),
    el('h3', {}, 'Stored call'),
    stored)
  const old = entry.li.querySelector(':scope > .detail')
  if (old) old.replaceWith(detail)
  else entry.li.append(detail)
}

function addIngestRecord (r) {
  const rejected = r.kind === 'rejected'
  if (rejected) state.nRejected++
  const li = el('li', { class: `call ${r.kind}`, data: { reason: r.reason ?? '' } })
  const why = rejected
    ? [el('span', { class: 'ev reason' }, r.reason ?? 'rejected'),
        r.field ? el('span', { class: 'who' }, r.field) : null,
        el('span', { class: 'who' }, r.message ?? ''),
        r.mode ? el('span', { class: 'mid' }, `${r.mode}${r.status ? ` · HTTP ${r.status}` : ' · answered 200'}`) : null]
    : [el('span', { class: 'ev' }, `dropped by ${r.reason}`)]
  li.append(el('div', { class: 'row' },
    el('span', { class: 'time' }, clock(r.at)),
    el('span', { class: `kind ${r.kind}` }, r.kind),
    el('span', { class: 'src' }, r.source ?? ''),
    el('span', { class: 'what' }, why),
    el('span', { class: 'outcomes' })))
  const fields = Object.entries(r).filter(([k]) => k !== 'kind' && k !== 'at')
  li.append(el('div', { class: 'detail' },
    el('table', {}, fields.map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', {}, String(v)))))))
  li.addEventListener('click', (ev) => { if (!ev.target.closest('.detail')) li.classList.toggle('open') })
  insert({ key: `#${++state.seq}`, li })
}

function addNotice (r) {
  const li = el('li', { class: 'call notice' }, el('div', { class: 'row' },
    el('span', { class: 'time' }, clock(r.at)),
    el('span', { class: 'kind dropped' }, 'overflow'),
    el('span', { class: 'src' }, ''),
    el('span', { class: 'what reason' },
      `${r.dropped} records dropped: this page did not keep up (the gateway holds ${state.buffer ?? 'a few thousand'} a watcher)`),
    el('span', { class: 'outcomes' })))
  insert({ key: `#${++state.seq}`, li })
}

function counts () {
  $('n-calls').textContent = state.nCalls
  $('n-rejected').textContent = state.nRejected
  $('n-dropped').textContent = state.dropped + state.heldLost
  $('held').textContent = state.paused ? ` · paused, ${state.held.length} waiting` : ''
  $('held').className = 'held'
  $('pause').textContent = state.paused ? `Resume (${state.held.length})` : 'Pause'
}

function showProcess (p) {
  if (!p) return
  $('process').textContent = `pid ${p.pid} on ${p.host} · ${p.backend} spool`
}

// -- the controls --------------------------------------------------------------

function readFilters () {
  const form = $('filters')
  const f = {}
  for (const k of FILTERS) f[k] = form.elements[k].value.trim()
  return f
}

function setup () {
  const params = new URLSearchParams(location.search)
  const form = $('filters')
  for (const k of FILTERS) form.elements[k].value = params.get(k) ?? ''
  state.filters = readFilters()
  form.addEventListener('submit', (ev) => {
    ev.preventDefault()
    state.filters = readFilters()
    const q = new URLSearchParams()
    for (const k of FILTERS) if (state.filters[k]) q.set(k, state.filters[k])
    history.replaceState(null, '', q.toString() ? `?${q}` : location.pathname)
    connect()
  })
  $('pause').addEventListener('click', () => {
    state.paused = !state.paused
    $('pause').setAttribute('aria-pressed', String(state.paused))
    if (!state.paused) {
      const held = state.held
      state.held = []
      for (const r of held) apply(r)
    }
    counts()
  })
  $('clear').addEventListener('click', () => {
    for (const key of state.order) state.calls.get(key)?.li.remove()
    state.calls.clear()
    state.order = []
    state.held = []
    state.heldLost = state.dropped = state.nCalls = state.nRejected = 0
    $('empty').hidden = false
    counts()
  })
  counts()
  connect()
  refreshStatus()
}

// -- the destinations ------------------------------------------------------------

async function refreshStatus () {
  try {
    const r = await fetch('/debugger/status', { cache: 'no-store' })
    if (!r.ok) throw new Error(`HTTP ${r.status}`)
    const s = await r.json()
    renderStatus(s)
    const dead = s.destinations.map((d) => `${d.name}:${d.dead}`).join(',')
    if (dead !== state.deadSeen) {
      state.deadSeen = dead
      state.deadDirty = 3
    }
    if (state.deadDirty > 0 || Date.now() - state.deadReadAt > DEAD_LETTERS_EVERY) {
      state.deadDirty = Math.max(0, state.deadDirty - 1)
      await refreshDeadLetters()
    }
  } catch (e) {
    $('destinations-panel').dataset.error = String(e)
  } finally {
    setTimeout(refreshStatus, STATUS_EVERY)
  }
}

function fill (datalist, values) {
  const list = $(datalist)
  if (list.dataset.values === values.join('\u0000')) return
  list.dataset.values = values.join('\u0000')
  list.replaceChildren(...values.map((v) => el('option', { value: v })))
}

function renderStatus (s) {
  showProcess(s.process)
  fill('sources', s.sources)
  fill('destinations', s.destinations.map((d) => d.name))
  const panel = $('destinations-panel')
  const cards = s.destinations.map((d) => card(d, s.at))
  panel.replaceChildren(...cards)
  if (!cards.length) panel.append(el('p', { class: 'empty' }, 'No destinations configured.'))
}

function card (d, now) {
  let st = ['ok', d.running ? 'delivering' : 'stopped']
  if (!d.enabled) st = ['disabled', 'disabled']
  else if (d.paused) st = ['paused', 'paused: fix its settings']
  else if (d.held_until) st = ['held', `on hold ${duration(d.held_until - now)}`]
  const num = (n, l, cls) => el('div', { class: cls }, el('span', { class: 'n' }, n), el('span', { class: 'l' }, l))
  const last = d.last_error
  const title = last && (last.status ? `HTTP ${last.status}` : 'error')
  return el('section', { class: 'dest', data: { destination: d.name, paused: String(d.paused) } },
    el('h3', {}, d.name, el('span', { class: 'type' }, d.type), el('span', { class: `state ${st[0]}` }, st[1])),
    el('div', { class: 'nums' },
      num(d.backlog, 'backlog', 'backlog'),
      num(duration(d.oldest_age), 'oldest', 'oldest'),
      num(d.retry_backlog, 'retrying', 'retry-backlog'),
      num(d.delivered, 'delivered', 'delivered'),
      num(d.skipped, 'skipped', 'skipped'),
      num(d.dead, 'dead', 'dead')),
    chart(d.rate),
    last
      ? el('div', { class: 'last-error' },
        el('strong', {}, title), last.reason !== title ? ` · ${last.reason}` : '',
        ` · ${ago(now - last.at)}`, last.messageId ? ` · ${last.messageId}` : '',
        last.excerpt ? el('span', { class: 'excerpt' }, last.excerpt) : null)
      : null)
}

function chart (points) {
  const W = 200
  const H = 34
  const box = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'delivery rate, last 10 minutes' })
  const peak = Math.max(1, ...points.map((p) => Math.max(p[1], p[2])))
  if (points.length) {
    const t0 = points[0][0] - 5
    const t1 = points[points.length - 1][0]
    const x = (t) => (W - 2) * (t - t0) / Math.max(1, t1 - t0) + 1
    const y = (v) => H - 3 - (H - 6) * v / peak
    for (const [i, cls] of [[1, 'delivered'], [2, 'failed']]) {
      const pts = [[t0, points[0][i]], ...points.map((p) => [p[0], p[i]])]
      box.append(svg('polyline', { class: cls, points: pts.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' ') }))
    }
  }
  const now = points.length ? points[points.length - 1] : [0, 0, 0]
  const top = Math.max(0, ...points.map((p) => p[1]))
  return el('div', { class: 'chart' }, box,
    el('span', { class: 'legend' }, `${rate(now[1])}/s now · peak ${rate(top)}/s`, el('br'),
      now[2] > 0 ? el('span', { class: 'failing' }, `${rate(now[2])}/s failing`) : 'delivered, last 10 min'))
}

// -- the dead letters --------------------------------------------------------------

async function refreshDeadLetters () {
  state.deadReadAt = Date.now()
  const r = await fetch('/debugger/dead-letters', { cache: 'no-store' })
  if (!r.ok) throw new Error(`HTTP ${r.status}`)
  const got = await r.json()
  $('dlq-total').textContent = got.total
  $('dlq-empty').hidden = got.total > 0
  const rows = []
  for (const x of got.letters) {
    const detail = el('tr', { class: 'letter-detail', hidden: true },
      el('td', { colspan: 6 },
        el('div', { class: 'excerpt' }, `${x.reason} · ${x.attempts} attempt(s) · source ${x.source} · answer: ${x.excerpt || '(none)'}`),
        el('pre', { class: 'json' }, pretty(x.call))))
    const button = el('button', {
      type: 'button', class: 'replay primary', title: 'Put it back in its destination\'s queue (gateway dlq replay)',
    }, 'Replay')
    button.addEventListener('click', (ev) => {
      ev.stopPropagation()
      replay(x, button)
    })
    const row = el('tr', { class: 'letter', data: { id: x.id, messageId: x.messageId, destination: x.destination, status: x.status ?? '' } },
      el('td', { class: 'time', title: new Date(x.at * 1000).toISOString() }, clock(x.at).slice(0, 8)),
      el('td', {}, x.destination),
      el('td', { class: 'mono', title: x.messageId }, x.messageId),
      el('td', { class: 'status' }, x.status ?? '—'),
      el('td', { class: 'reason', title: x.reason }, x.reason),
      el('td', {}, button))
    row.addEventListener('click', () => { detail.hidden = !detail.hidden })
    rows.push(row, detail)
  }
  if (got.total > got.letters.length) {
    rows.push(el('tr', {}, el('td', { colspan: 6, class: 'empty' },
      `the newest ${got.letters.length} of ${got.total}; gateway dlq list shows them all`)))
  }
  $('dead-letters').replaceChildren(...rows)
}

async function replay (x, button) {
  button.disabled = true
  const msg = $('dlq-message')
  try {
    const r = await fetch('/debugger/replay', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ destination: x.destination, messageId: x.messageId }),
    })
    const got = await r.json()
    if (r.ok) {
      msg.className = 'dlq-message'
      msg.textContent = `Replayed ${got.replayed} dead letter(s) of ${x.destination} (${x.messageId}): queued for delivery now.`
    } else {
      msg.className = 'dlq-message error'
      msg.textContent = got.error || (r.status === 404 ? 'Already replayed.' : `HTTP ${r.status}`)
    }
  } catch (e) {
    msg.className = 'dlq-message error'
    msg.textContent = `Replay failed: ${e}`
  } finally {
    await refreshDeadLetters().catch(() => {})
  }
}

document.addEventListener('DOMContentLoaded', setup)
