// Verifies a notification subledger sends, as the Standard Webhooks specification
// (standardwebhooks.com) defines it: `webhook-id`, `webhook-timestamp` and
// `webhook-signature` headers; the signature is `v1,` + base64(HMAC-SHA256(key,
// `${id}.${timestamp}.${body}`)), the key being the base64 after `whsec_` in the secret;
// several space-separated signatures may be sent (during a secret's rotation), any one
// matching is enough. It must be given the raw body, exactly as received: a body parsed
// and serialized again no longer matches its signature.

import { createHmac, timingSafeEqual } from "node:crypto";

export interface VerifyOptions {
  /** How far the timestamp may be from now, both ways (default 300 s, as the spec suggests). */
  toleranceSeconds?: number;
  /** Now, in seconds since the epoch (tests). */
  now?: number;
}

export class NotificationVerificationError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NotificationVerificationError";
  }
}

type HeaderSource = Headers | Record<string, string | string[] | undefined>;

function header(headers: HeaderSource, name: string): string | undefined {
  if (typeof (headers as Headers).get === "function") {
    return (headers as Headers).get(name) ?? undefined;
  }
  const record = headers as Record<string, string | string[] | undefined>;
  const key = Object.keys(record).find((k) => k.toLowerCase() === name);
  const value = key === undefined ? undefined : record[key];
  return Array.isArray(value) ? value[0] : value;
}

/**
 * Checks the signature and the timestamp of a notification and returns its parsed JSON
 * body; throws `NotificationVerificationError` otherwise.
 */
export function verifyNotification(
  body: string | Uint8Array,
  headers: HeaderSource,
  secret: string,
  options: VerifyOptions = {},
): unknown {
  const id = header(headers, "webhook-id");
  const timestamp = header(headers, "webhook-timestamp");
  const signatures = header(headers, "webhook-signature");
  if (!id || !timestamp || !signatures) {
    throw new NotificationVerificationError("missing webhook-id, webhook-timestamp or webhook-signature");
  }
  const seconds = Number(timestamp);
  if (!/^\d+$/.test(timestamp) || !Number.isSafeInteger(seconds)) {
    throw new NotificationVerificationError("webhook-timestamp is not a whole number of seconds");
  }
  const now = options.now ?? Math.floor(Date.now() / 1000);
  const tolerance = options.toleranceSeconds ?? 300;
  if (Math.abs(now - seconds) > tolerance) {
    throw new NotificationVerificationError("webhook-timestamp is outside the tolerance");
  }
  const key = Buffer.from(secret.startsWith("whsec_") ? secret.slice(6) : secret, "base64");
  const payload = typeof body === "string" ? Buffer.from(body, "utf8") : Buffer.from(body);
  const expected = createHmac("sha256", key)
    .update(`${id}.${timestamp}.`)
    .update(payload)
    .digest();
  const matches = signatures.split(" ").some((candidate) => {
    const [version, signature] = candidate.split(",", 2);
    if (version !== "v1" || !signature) return false;
    const given = Buffer.from(signature, "base64");
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
  if (!matches) {
    throw new NotificationVerificationError("no signature matches");
  }
  return JSON.parse(payload.toString("utf8"));
}
