// The six calls every test page makes, the same for both SDKs.
//
// `analytics` is either a loaded instance (npm form: every method returns a
// promise of the call's Context, resolved once the SDK has tried to deliver
// it) or the snippet's stub (snippet form: calls are queued until the SDK
// loads, and return nothing useful). window.__results is the page's own
// view, read by drive.mjs at the end.
window.__results = { done: false, calls: [], error: null }

function sixCalls(analytics) {
  return [
    ['identify', () => analytics.identify('user-42', { email: 'ada@example.com', name: 'Ada Lovelace' })],
    ['track', () => analytics.track('Order Completed', { order_id: 'o-1', revenue: 42.5, currency: 'EUR' })],
    ['page', () => analytics.page('Docs', 'Browser SDKs', { section: 'gateway' })],
    ['screen', () => analytics.screen('Onboarding', 'Step 2', { step: 2 })],
    ['group', () => analytics.group('org-7', { name: 'Acme', plan: 'pro' })],
    // After identify('user-42') the SDK fills previousId with the current
    // userId: an alias whose userId equals its previousId.
    ['alias', () => analytics.alias('user-42')],
  ]
}

function outcome(name, result) {
  const ctx = Array.isArray(result) ? result[0] : result
  const failed = ctx && typeof ctx.failedDelivery === 'function' ? ctx.failedDelivery() : undefined
  return {
    name,
    messageId: ctx?.event?.messageId ?? null,
    failed: failed ? String(failed.reason?.message ?? failed.reason ?? failed) : null,
  }
}

// npm form: one call after the other, each awaited.
async function runCalls(analytics) {
  try {
    for (const [name, call] of sixCalls(analytics)) {
      window.__results.calls.push(outcome(name, await call()))
    }
  } catch (e) {
    window.__results.error = String(e?.stack ?? e)
  }
  window.__results.done = true
}

// snippet form: queued on the stub before the SDK has even loaded.
function queueCalls(analytics) {
  for (const [name, call] of sixCalls(analytics)) {
    call()
    window.__results.calls.push({ name, queued: true })
  }
  window.__results.done = true
}
