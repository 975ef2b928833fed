// Opens one page in headless Chromium and keeps it open until told to stop.
//
//   node drive.mjs '{"url": "http://127.0.0.1:PORT/segment-npm.html", "timeoutMs": 45000}'
//
// Driven by tests/test_browser.py: the test watches its sink, then writes
// "quit" to our stdin (or closes it). We then print one JSON line, the
// report: what the page logged, every request it made and how it ended,
// `window.__results` (the page's own view of its calls) and the browser's
// userAgent. Diagnostics go to stderr. We stop by ourselves at timeoutMs.
//
// Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM): playwright-core
// never downloads a browser. The profile is a fresh empty directory, and
// the flags keep Chromium from reaching for the network on its own.

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { chromium } from 'playwright-core'

const opts = JSON.parse(process.argv[2] ?? '{}')
const url = opts.url
const timeoutMs = opts.timeoutMs ?? 45000
const executablePath = opts.chromium ?? process.env.CHROMIUM ?? '/usr/bin/chromium'
if (!url) {
  console.error('usage: node drive.mjs \'{"url": "..."}\'')
  process.exit(2)
}

const started = Date.now()
const elapsed = () => Date.now() - started
const log = (...a) => console.error(`[drive +${elapsed()}ms]`, ...a)

const report = {
  url, userAgent: null, console: [], pageErrors: [], requests: [], results: null,
  timedOut: false, error: null,
}

const userDataDir = mkdtempSync(join(tmpdir(), 'gateway-chromium-'))
let context
let finished = false

async function finish(code) {
  if (finished) return
  finished = true
  clearTimeout(deadline)
  if (context) {
    try {
      const page = context.pages()[0]
      if (page) report.results = await page.evaluate(() => window.__results ?? null)
    } catch (e) {
      report.error = report.error ?? `reading window.__results: ${e.message}`
    }
    await context.close().catch((e) => log('close:', e.message))
  }
  rmSync(userDataDir, { recursive: true, force: true })
  process.stdout.write(JSON.stringify(report) + '\n', () => process.exit(code))
}

const deadline = setTimeout(() => {
  report.timedOut = true
  log(`no "quit" after ${timeoutMs} ms: stopping`)
  finish(3)
}, timeoutMs)

// The test says when it has seen enough; a closed stdin means the same.
createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'quit') finish(report.error ? 1 : 0)
}).on('close', () => finish(report.error ? 1 : 0))

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    timeout: 30000,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  })
  log('chromium', context.browser()?.version() ?? '(persistent context)')
  const page = context.pages()[0] ?? await context.newPage()
  const byRequest = new Map()
  page.on('request', (req) => {
    const entry = { method: req.method(), url: req.url(), type: req.resourceType(), status: null, failure: null }
    if (req.method() === 'POST') {
      // what the SDK sent, to compare with what the destination got
      const headers = req.headers()
      entry.contentType = headers['content-type'] ?? null
      entry.authorization = headers['authorization'] ?? null
      entry.retryCount = headers['x-retry-count'] ?? null
      entry.body = req.postData()
    }
    byRequest.set(req, entry)
    report.requests.push(entry)
  })
  page.on('response', (resp) => {
    const entry = byRequest.get(resp.request())
    if (entry) entry.status = resp.status()
  })
  page.on('requestfailed', (req) => {
    const entry = byRequest.get(req)
    if (entry) entry.failure = req.failure()?.errorText ?? 'failed'
    log('request failed:', req.method(), req.url(), req.failure()?.errorText)
  })
  page.on('console', (msg) => {
    report.console.push({ type: msg.type(), text: msg.text() })
    log(`console.${msg.type()}:`, msg.text())
  })
  page.on('pageerror', (err) => {
    report.pageErrors.push(String(err?.stack ?? err))
    log('page error:', err)
  })
  await page.goto(url, { waitUntil: 'load', timeout: 20000 })
  report.userAgent = await page.evaluate(() => navigator.userAgent)
  log('loaded', url)
  process.stderr.write('READY\n')
} catch (e) {
  report.error = String(e?.stack ?? e)
  log('error:', report.error)
  await finish(1)
}
