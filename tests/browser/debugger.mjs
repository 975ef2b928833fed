// Opens the gateway's debugger page in headless Chromium and does what the
// test asks, one command a line, until told to quit.
//
//   node debugger.mjs '{"url": "http://127.0.0.1:PORT/debugger", "username": "...", "password": "..."}'
//
// Driven by tests/test_debugger_browser.py. Each line on stdin is a JSON
// command {"id": N, "op": ..., ...}; each answer is one JSON line on stdout,
// {"id": N, "ok": true, "value": ...} or {"id": N, "ok": false, "error": "..."}.
// Ops: wait (a selector, visible, optionally with text), count, text, click,
// fill, press, eval, screenshot, report (console, page errors and every
// request the page made), quit. Diagnostics go to stderr. We stop by
// ourselves at timeoutMs.
//
// Chromium is Debian's, launched as drive.mjs launches it (same flags, a
// fresh empty profile; playwright-core never downloads a browser). The
// admin's credentials are the context's httpCredentials: Chromium answers
// the gateway's Basic challenge with them, as a person would at the prompt.

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { chromium } from 'playwright-core'

const opts = JSON.parse(process.argv[2] ?? '{}')
const url = opts.url
const timeoutMs = opts.timeoutMs ?? 90000
const executablePath = opts.chromium ?? process.env.CHROMIUM ?? '/usr/bin/chromium'
if (!url) {
  console.error('usage: node debugger.mjs \'{"url": "...", "username": "...", "password": "..."}\'')
  process.exit(2)
}

const started = Date.now()
const log = (...a) => console.error(`[debugger +${Date.now() - started}ms]`, ...a)
const report = { console: [], pageErrors: [], requests: [] }
const userDataDir = mkdtempSync(join(tmpdir(), 'gateway-chromium-'))
let context
let page
let finished = false

function answer (msg) {
  return new Promise((resolve) => process.stdout.write(JSON.stringify(msg) + '\n', resolve))
}

async function finish (code) {
  if (finished) return
  finished = true
  clearTimeout(deadline)
  if (context) await context.close().catch((e) => log('close:', e.message))
  rmSync(userDataDir, { recursive: true, force: true })
  process.exit(code)
}

const deadline = setTimeout(() => {
  log(`no "quit" after ${timeoutMs} ms: stopping`)
  finish(3)
}, timeoutMs)

function locator (cmd) {
  const loc = page.locator(cmd.selector)
  return cmd.text ? loc.filter({ hasText: cmd.text }) : loc
}

const ops = {
  async wait (cmd) {
    const loc = locator(cmd).first()
    await loc.waitFor({ state: cmd.state ?? 'visible', timeout: cmd.timeoutMs ?? 10000 })
    if (cmd.state === 'detached' || cmd.state === 'hidden') return null
    return await loc.evaluate((e) => e.innerText ?? e.textContent)
  },
  async count (cmd) { return await locator(cmd).count() },
  async text (cmd) { return await locator(cmd).allInnerTexts() },
  async click (cmd) {
    await locator(cmd).first().click({ timeout: cmd.timeoutMs ?? 10000 })
    return null
  },
  async fill (cmd) {
    await locator(cmd).first().fill(cmd.value, { timeout: cmd.timeoutMs ?? 10000 })
    return null
  },
  async press (cmd) {
    await locator(cmd).first().press(cmd.key, { timeout: cmd.timeoutMs ?? 10000 })
    return null
  },
  // an expression, or a function's source called with cmd.arg
  async eval (cmd) { return await page.evaluate(cmd.expression, cmd.arg) },
  async screenshot (cmd) {
    await page.screenshot({ path: cmd.path, fullPage: cmd.fullPage ?? false, animations: 'disabled' })
    return null
  },
  async report () { return report },
}

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    timeout: 30000,
    viewport: opts.viewport ?? { width: 1240, height: 680 },
    deviceScaleFactor: 1,
    httpCredentials: { username: opts.username ?? '', password: opts.password ?? '' },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      // grayscale text: a screenshot that compresses (docs/debugger.png)
      '--disable-lcd-text',
    ],
  })
  page = context.pages()[0] ?? await context.newPage()
  page.on('request', (req) => report.requests.push({ method: req.method(), url: req.url() }))
  page.on('console', (msg) => {
    report.console.push({ type: msg.type(), text: msg.text() })
    log(`console.${msg.type()}:`, msg.text())
  })
  page.on('pageerror', (err) => {
    report.pageErrors.push(String(err?.stack ?? err))
    log('page error:', err)
  })
  const resp = await page.goto(url, { waitUntil: 'load', timeout: 20000 })
  log('loaded', url, resp?.status())
  await answer({ id: 0, ok: true, value: { status: resp?.status() ?? null } })
} catch (e) {
  log('error:', String(e?.stack ?? e))
  await answer({ id: 0, ok: false, error: String(e?.stack ?? e) })
  await finish(1)
}

// One command at a time, in order.
let queue = Promise.resolve()
createInterface({ input: process.stdin }).on('line', (line) => {
  queue = queue.then(async () => {
    let cmd
    try {
      cmd = JSON.parse(line)
    } catch (e) {
      return
    }
    if (cmd.op === 'quit') {
      await answer({ id: cmd.id, ok: true, value: null })
      await finish(0)
      return
    }
    const op = ops[cmd.op]
    try {
      if (!op) throw new Error(`no op ${cmd.op}`)
      await answer({ id: cmd.id, ok: true, value: await op(cmd) })
    } catch (e) {
      await answer({ id: cmd.id, ok: false, error: String(e?.message ?? e) })
    }
  })
}).on('close', () => { queue.then(() => finish(0)) })
