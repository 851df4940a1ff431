// The benchmark's peer: @supabase/stripe-sync-engine processing signed Stripe webhooks
// into its own Postgres schema, behind a minimal HTTP server (the package ships no
// server). Related-entity backfill and revalidation are off; the one call it still makes
// (checkout sessions' line items, unconditionally) goes to a local stub of Stripe's API
// answering an empty list, since this machine has no route to Stripe.
// Usage: node server.cjs PORT DATABASE_URL WEBHOOK_SECRET
const http = require('node:http');
const Stripe = require('stripe');
const { StripeSync, runMigrations } = require('@supabase/stripe-sync-engine');

/** Stripe's API at its HTTP boundary: every list is empty, anything else is a 404. */
function startStripeStub() {
  return new Promise((resolve) => {
    const stub = http.createServer((req, res) => {
      const list = req.method === 'GET' && /\/line_items/.test(req.url);
      res.writeHead(list ? 200 : 404, { 'content-type': 'application/json' });
      res.end(list
        ? JSON.stringify({ object: 'list', data: [], has_more: false, url: req.url.split('?')[0] })
        : JSON.stringify({ error: { type: 'invalid_request_error', message: 'not in the stub' } }));
    });
    stub.listen(0, '127.0.0.1', () => resolve(stub.address().port));
  });
}

const [port, databaseUrl, secret] = process.argv.slice(2);

async function main() {
await runMigrations({ databaseUrl, schema: 'stripe', logger: { info() {}, warn() {}, error: console.error } });
const sync = new StripeSync({
  poolConfig: { connectionString: databaseUrl, max: 16 },
  schema: 'stripe',
  stripeSecretKey: 'sk_test_unused',
  stripeWebhookSecret: secret,
  backfillRelatedEntities: false,
  revalidateObjectsViaStripeApi: [],
  autoExpandLists: false,
  logger: { info() {}, warn() {}, error() {}, debug() {}, child() { return this; } },
});
sync.stripe = new Stripe('sk_test_unused', {
  host: '127.0.0.1',
  port: await startStripeStub(),
  protocol: 'http',
  maxNetworkRetries: 0,
});
let failures = 0;
http
  .createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      try {
        await sync.processWebhook(Buffer.concat(chunks), req.headers['stripe-signature']);
        res.writeHead(200).end('{"received":true}');
      } catch (e) {
        failures += 1;
        if (failures <= 5) console.error(`peer: ${e.message}`);
        res.writeHead(400).end(JSON.stringify({ error: String(e.message) }));
      }
    });
  })
  .listen(Number(port), '127.0.0.1', () => console.log(`peer listening on ${port}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
