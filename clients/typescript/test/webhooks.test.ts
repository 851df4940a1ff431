// The notification verifier against an independent implementation of Standard Webhooks:
// the `standardwebhooks` package signs, ours verifies.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Webhook } from "standardwebhooks";

import { NotificationVerificationError, verifyNotification } from "../src/index.js";

const secret = "whsec_" + Buffer.from("a secret of thirty-two bytes....").toString("base64");
const body = JSON.stringify({
  type: "entitlements.updated",
  data: { org_id: "org_123", after: { access: true, plan: "pro" } },
});

function signed(id: string, at: Date, payload = body, key = secret) {
  const signature = new Webhook(key).sign(id, at, payload);
  return {
    "webhook-id": id,
    "webhook-timestamp": String(Math.floor(at.getTime() / 1000)),
    "webhook-signature": signature,
  };
}

test("a notification signed by standardwebhooks verifies and parses", () => {
  const now = new Date();
  const parsed = verifyNotification(body, signed("msg_1", now), secret) as { type: string };
  assert.equal(parsed.type, "entitlements.updated");
  // Fetch's Headers too.
  verifyNotification(body, new Headers(signed("msg_2", now)), secret);
  // And the package agrees with itself on what we accept.
  new Webhook(secret).verify(body, signed("msg_3", now));
});

test("a tampered body, another secret, a stale timestamp are refused", () => {
  const now = new Date();
  const headers = signed("msg_4", now);
  const refused = (f: () => unknown) => assert.throws(f, NotificationVerificationError);
  refused(() => verifyNotification(body.replace("pro", "max"), headers, secret));
  const other = "whsec_" + Buffer.from("another secret of 32 bytes......").toString("base64");
  refused(() => verifyNotification(body, headers, other));
  const old = new Date(now.getTime() - 10 * 60 * 1000);
  refused(() => verifyNotification(body, signed("msg_5", old), secret));
  refused(() => verifyNotification(body, { ...headers, "webhook-id": "msg_other" }, secret));
  refused(() => verifyNotification(body, { "webhook-id": "msg_4" }, secret));
});

test("during a rotation any one of several signatures is enough", () => {
  const now = new Date();
  const other = "whsec_" + Buffer.from("another secret of 32 bytes......").toString("base64");
  const a = signed("msg_6", now, body, other)["webhook-signature"];
  const b = signed("msg_6", now)["webhook-signature"];
  const headers = { ...signed("msg_6", now), "webhook-signature": `${a} ${b}` };
  verifyNotification(body, headers, secret);
  verifyNotification(body, headers, other);
});
