// Sends calls through one Node.js server SDK, unchanged, and reports how each ended.
//
//   node drive.mjs '{"sdk": "segment", "host": "http://127.0.0.1:PORT", "writeKey": "...",
//                    "calls": [{"type": "track", "userId": "u", "event": "E", ...}],
//                    "options": {...}, "report": "/tmp/report.json", "timeoutMs": 20000,
//                    "closeTimeoutMs": 18000}'
//
// Driven by tests/test_node_sdks.py (every call type, fields intact, gzip) and
// scripts/measure_sdk_errors.py (what each SDK does with 400, 429 and 503).
// `sdk` is segment (@segment/analytics-node), customerio
// (@customerio/cdp-analytics-node) or rudderstack (@rudderstack/rudder-sdk-node);
// each is pointed at `host` with the option its README names, and `options`
// are passed on as they are (maxRetries, gzip, flushInterval, ...).
//
// Each call is the SDK's own method with the call's fields as its argument
// (`type` removed). Then the SDK is flushed and closed the way its docs say
// (closeAndFlush, or flush for RudderStack's). The report, written to
// `report` as JSON (stdout is the SDKs' to log on), says for each call
// whether the SDK counts it delivered, and lists every error the SDK
// reported, every unhandled rejection and how long the run took.

import { writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const opts = JSON.parse(process.argv[2] ?? '{}')
const { sdk, host, writeKey, calls = [], options = {}, report: reportPath, timeoutMs = 20000, closeTimeoutMs } = opts
if (!sdk || !host || !writeKey || !reportPath) {
  console.error('usage: node drive.mjs \'{"sdk": "segment|customerio|rudderstack", "host": "...", ' +
    '"writeKey": "...", "calls": [...], "report": "/path/report.json"}\'')
  process.exit(2)
}

const PACKAGES = {
  segment: '@segment/analytics-node',
  customerio: '@customerio/cdp-analytics-node',
  rudderstack: '@rudderstack/rudder-sdk-node',
}
const started = Date.now()
const report = {
  sdk, package: PACKAGES[sdk], version: null, results: [], errors: [], unhandled: [], elapsedMs: null,
  timedOut: false,
}

function describe(err) {
  if (err === undefined || err === null) return null
  if (err instanceof Error) return `${err.name}: ${err.message}`
  try { return JSON.stringify(err) } catch { return String(err) }
}

let written = false
function finish(code) {
  if (written) return
  written = true
  report.elapsedMs = Date.now() - started
  writeFileSync(reportPath, JSON.stringify(report))
  process.exit(code)
}

// RudderStack's flush rethrows a failed send; from its own timer nobody
// catches it. Recorded, not fatal, so the report says it happened.
process.on('unhandledRejection', (reason) => { report.unhandled.push(describe(reason)) })
process.on('uncaughtException', (err) => { report.unhandled.push(describe(err)) })
setTimeout(() => { report.timedOut = true; finish(3) }, timeoutMs).unref()

if (!PACKAGES[sdk]) {
  report.errors.push(`unknown sdk ${sdk}`)
  finish(2)
}
report.version = require(`${PACKAGES[sdk]}/package.json`).version

/** JSON has no dates: a call's `timestamp` goes to the SDK as a Date, as
 * JavaScript code passes it (RudderStack's SDK refuses a string). */
function withDates(call) {
  return typeof call.timestamp === 'string' ? { ...call, timestamp: new Date(call.timestamp) } : call
}

/** Call `method` with the call's fields; resolve with how the SDK says it ended. */
function sendSegmentLike(client, call) {
  const { type, ...fields } = withDates(call)
  return new Promise((resolve) => {
    client[type](fields, (err, ctx) => {
      const failed = ctx?.failedDelivery?.()
      resolve({ type, messageId: fields.messageId ?? ctx?.event?.messageId ?? null,
        error: describe(err ?? failed?.reason) })
    })
  })
}

async function runSegmentLike(Analytics) {
  // Segment's and Customer.io's Node SDKs: host + path (default /v1/batch).
  const client = new Analytics({ writeKey, host, ...options })
  client.on('error', (err) => report.errors.push(describe(err?.reason ?? err)))
  const sent = calls.map((call) => sendSegmentLike(client, call))
  // closeTimeoutMs absent: the SDK's own default (Segment's 75 s, Customer.io's 1.25 flushIntervals)
  await client.closeAndFlush(closeTimeoutMs === undefined ? undefined : { timeout: closeTimeoutMs })
  report.results = await Promise.all(sent)
}

async function runRudderStack(Analytics) {
  // RudderStack's Node SDK: dataPlaneUrl (+ /v1/batch); gzip on by default.
  const client = new Analytics(writeKey, { dataPlaneUrl: host, logLevel: 'error', ...options })
  const sent = calls.map((call) => new Promise((resolve) => {
    const { type, ...fields } = withDates(call)
    client[type](fields, (err) => resolve({ type, messageId: fields.messageId ?? null, error: describe(err) }))
  }))
  try {
    await client.flush()
  } catch (err) {
    report.errors.push(describe(err))
  }
  // The first call is sent on its own at once; flush() sends the rest.
  report.results = await Promise.all(sent)
}

try {
  if (sdk === 'rudderstack') {
    await runRudderStack(require(PACKAGES.rudderstack))
  } else {
    await runSegmentLike(require(PACKAGES[sdk]).Analytics)
  }
  finish(0)
} catch (err) {
  report.errors.push(describe(err))
  finish(1)
}
