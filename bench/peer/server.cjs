// The benchmark's peer: @supabase/stripe-sync-engine processing signed Stripe webhooks
// into its own Postgres schema, behind a minimal HTTP server (the package ships no
// server). It never calls Stripe's API: related-entity backfill and revalidation are off.
// Usage: node server.cjs PORT DATABASE_URL WEBHOOK_SECRET
const http = require('node:http');
const { StripeSync, runMigrations } = require('@supabase/stripe-sync-engine');

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
