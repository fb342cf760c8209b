// Display helpers. Money arrives as integer micro-credits; it is shown as credits written exactly as the API's
// `balance_credits` (core/accounts.format_credits: up to six decimals, trailing zeros dropped, no grouping), so a
// figure on screen can be pasted back into a form or compared with the API. BigInt: nothing rounds.

const MICRO = 1_000_000n;

export function credits(micro) {
  let value = BigInt(micro ?? 0);
  const sign = value < 0n ? "-" : "";
  if (value < 0n) value = -value;
  const whole = value / MICRO;
  const frac = value % MICRO;
  if (frac === 0n) return `${sign}${whole}`;
  return `${sign}${whole}.${frac.toString().padStart(6, "0").replace(/0+$/, "")}`;
}

/** A signed change: "+2", "−0.000123" (a real minus sign reads better in a table). */
export function signedCredits(micro) {
  const value = BigInt(micro ?? 0);
  if (value > 0n) return `+${credits(value)}`;
  if (value < 0n) return `\u2212${credits(-value)}`;
  return "0";
}

export function int(n) {
  return Number(n ?? 0).toLocaleString("en-US");
}

/** Short numbers for chart axes: 950, 1.2k, 3.4M. */
export function compact(n) {
  const abs = Math.abs(n);
  if (abs >= 1e9) return `${trim(n / 1e9)}G`;
  if (abs >= 1e6) return `${trim(n / 1e6)}M`;
  if (abs >= 1e3) return `${trim(n / 1e3)}k`;
  return trim(n);
}

function trim(x) {
  return String(Number(x.toFixed(x >= 10 || x <= -10 ? 0 : 1)));
}

/** Unix seconds -> "2025-11-25 14:03:22" (UTC, like every date in the console). */
export function dateTime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);
}

export function date(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().slice(0, 10) : "";
}

/** Today's date in UTC (the day the gateway files today's usage under). */
export function todayUTC() {
  return new Date().toISOString().slice(0, 10);
}

export function addDays(day, n) {
  const t = Date.parse(`${day}T00:00:00Z`) + n * 86_400_000;
  return new Date(t).toISOString().slice(0, 10);
}

/** Every day from `since` to `until` inclusive, so charts keep empty days as gaps instead of skipping them. */
export function daysBetween(since, until) {
  const days = [];
  for (let d = since; d <= until; d = addDays(d, 1)) days.push(d);
  return days;
}

export function plural(n, word, many = `${word}s`) {
  return `${int(n)} ${n === 1 ? word : many}`;
}
