/**
 * Small async helpers: debounce, throttle, retry with backoff, and a
 * promise pool that limits how many tasks run at once.
 */

export function debounce(fn, waitMs) {
  let timer = null;
  const debounced = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      timer = null;
      fn(...args);
    }, waitMs);
  };
  debounced.cancel = () => clearTimeout(timer);
  return debounced;
}

export function throttle(fn, intervalMs) {
  let last = 0;
  return (...args) => {
    const now = Date.now();
    if (now - last >= intervalMs) {
      last = now;
      return fn(...args);
    }
    return undefined;
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Retry an async function.  Delay doubles after each failure, with a bit
 * of jitter so many clients don't retry in lockstep.
 */
export async function retry(task, { attempts = 4, baseMs = 200, maxMs = 5000 } = {}) {
  let lastError;
  for (let i = 0; i < attempts; i++) {
    try {
      return await task(i);
    } catch (err) {
      lastError = err;
      if (i === attempts - 1) break;
      const delay = Math.min(maxMs, baseMs * 2 ** i);
      await sleep(delay / 2 + Math.random() * (delay / 2));
    }
  }
  throw lastError;
}

/** Run `tasks` (functions returning promises) with at most `limit` in flight. */
export async function pool(tasks, limit = 4) {
  const results = new Array(tasks.length);
  let next = 0;

  async function worker() {
    while (next < tasks.length) {
      const index = next++;
      try {
        results[index] = { ok: true, value: await tasks[index]() };
      } catch (error) {
        results[index] = { ok: false, error };
      }
    }
  }

  const workers = Array.from({ length: Math.min(limit, tasks.length) }, worker);
  await Promise.all(workers);
  return results;
}

// Example: fetch a few URLs, three at a time, each with retries.
// const urls = ['https://example.com/a', 'https://example.com/b'];
// const out = await pool(urls.map((u) => () => retry(() => fetch(u))), 3);
