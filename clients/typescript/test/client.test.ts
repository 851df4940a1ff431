// The client against a live subledger, started by the Rust integration test
// `typescript_client` (tests/integration/openapi.rs) with org_123 (customer cus_123) on
// the `pro` plan, active. Run alone: SUBLEDGER_URL=… SUBLEDGER_TOKEN=… npm test.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Subledger, SubledgerError } from "../src/index.js";

const baseUrl = process.env.SUBLEDGER_URL;
const token = process.env.SUBLEDGER_TOKEN ?? "";
const live = { skip: baseUrl ? false : "SUBLEDGER_URL is not set (the Rust test sets it)" };

function client(t = token): Subledger {
  return new Subledger({ baseUrl: baseUrl ?? "", token: t });
}

test("entitlements of a paying org", live, async () => {
  const e = await client().entitlements("org_123");
  assert.equal(e.access, true);
  assert.equal(e.status, "active");
  assert.equal(e.plan, "pro");
  assert.equal(e.customer_id, "cus_123");
  assert.ok(e.features.includes("api"));
  assert.ok(e.access_until && Date.parse(e.access_until) > Date.now());
});

test("an org never seen has no access", live, async () => {
  const e = await client().entitlements("org_never");
  assert.equal(e.access, false);
  assert.equal(e.status, "none");
});

test("can(org, feature) follows the plan's features", live, async () => {
  const c = client();
  assert.equal(await c.can("org_123", "api"), true);
  assert.equal(await c.can("org_123", "projects:unlimited"), true);
  assert.equal(await c.can("org_123", "sso"), false);
  assert.equal(await c.can("org_never", "api"), false);
  assert.equal(await c.userCan("user_of_org_123", "api"), true);
  const f = await c.feature("org_123", "api");
  assert.deepEqual(Object.keys(f).sort(), ["access", "access_until", "feature", "plan"]);
  assert.equal(f.plan, "pro");
});

test("subscription(customer), null when never seen", live, async () => {
  const s = await client().subscription("cus_123");
  assert.ok(s);
  assert.equal(s.status, "active");
  assert.equal(s.org_id, "org_123");
  assert.equal(await client().subscription("cus_never"), null);
});

test("errors carry the status and the ErrorBody's code", live, async () => {
  await assert.rejects(client("wrong-token").entitlements("org_123"), (error: unknown) => {
    assert.ok(error instanceof SubledgerError);
    assert.equal(error.status, 401);
    assert.equal(error.code, "unauthorized");
    return true;
  });
  await assert.rejects(client().can("org_123", "a b"), (error: unknown) => {
    assert.ok(error instanceof SubledgerError);
    assert.equal(error.status, 400);
    assert.equal(error.code, "invalid_parameter");
    return true;
  });
});
