//! Mutation tests (issue 15): every shared fixture (../shared/fixtures, read as
//! `fixtures.rs` reads them) is mutated at random, several mutations at a time (a key
//! removed, a value made null, the wrong type, a huge number, an odd string: a NUL, a lone
//! surrogate, invalid bytes, a very long one; deep nesting, a long array, another event
//! type), and each mutant is posted signed to the real binary, against real Postgres and
//! Redis. So are thin events (`"object": "v2.core.event"`, issue 12) and Amazon
//! EventBridge envelopes around both kinds, the latter to `/webhooks/eventbridge` with the
//! header secret; thin events are fetched from a fake Stripe. No answer may be a 5xx (or
//! none at all), no row may be left retrying (a refusal taken for an outage), the process
//! must stay up, and a clean set of simulated lifecycles delivered afterwards, shuffled and
//! duplicated, must end where the domain says.
//!
//! The generator is seeded: `SUBLEDGER_MUTATION_SEED` reproduces a run (a fresh seed is
//! drawn otherwise, and printed), `SUBLEDGER_MUTANTS_PER_FIXTURE` sets how many mutants
//! each fixture gets (default 8). A failure prints the seed and each failing mutant's
//! mutations, and writes its exact body under `target/mutants/`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use projections::{Catalog, SubscriptionInfo};
use serde_json::{json, Value};
use subledger::stripe::event::HANDLED_TYPES;

use crate::deliveries::envelope_of;
use crate::fixtures::load;
use crate::lifecycle::fold;
use crate::support::fake_stripe::FakeStripe;
use crate::support::helpers::{settle, test_settings, SERVED_PROJECTIONS};
use crate::support::procs::{answers, post_all, post_event, scratch, serve_command, Served};
use crate::support::stripe_sim::{shuffle_with_duplicates, simulate, SimEvent};

const DEFAULT_PER_FIXTURE: usize = 8;

/// The EventBridge connection's header secret the served process is given.
const EB_HEADER: &str = "x-subledger-eventbridge-secret";
const EB_SECRET: &str = "eb-mutants-secret";

/// Where a mutant is posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// `/webhooks/stripe`, signed: the body is the Stripe event.
    Webhook,
    /// `/webhooks/eventbridge` with the header secret: the body is the EventBridge event
    /// whose `detail` is the Stripe event.
    EventBridge,
}

/// What mutants are made from: a fixture, a thin event, or an EventBridge envelope.
struct Seed {
    name: String,
    body: Vec<u8>,
    to: To,
}

/// splitmix64: each mutant gets its own stream, drawn from the run's seed, so one mutant
/// is rebuilt exactly from (seed, its number).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Text that a JSON value cannot hold (it is not a Rust string), spliced into the
/// serialized body in place of a marker string.
const RAW_TEXT: [(&str, &[u8]); 5] = [
    ("a lone high surrogate", br#""\ud800""#),
    ("a lone low surrogate", br#""x\udfffy""#),
    ("a reversed surrogate pair", br#""\udc00\ud800""#),
    ("invalid UTF-8 bytes", b"\"\xff\xfe\xfd\""),
    ("a truncated UTF-8 sequence", b"\"ab\xe2\x82\""),
];

/// Odd but valid strings.
fn odd_strings() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("a NUL", "\u{0}".to_owned()),
        ("a NUL inside", "cus_\u{0}x".to_owned()),
        ("control characters", "\u{1}\u{8}\u{1f}\u{7f}".to_owned()),
        ("a byte-order mark", "\u{feff}sub_1".to_owned()),
        (
            "line and paragraph separators",
            "a\u{2028}b\u{2029}".to_owned(),
        ),
        ("right-to-left override", "\u{202e}evil".to_owned()),
        ("emoji and combining marks", "👩‍👩‍👧 é̀ ﷽".to_owned()),
        ("SQL", "'; DROP TABLE inbox; --".to_owned()),
        ("a format string", "%s%n%x{}{0}".to_owned()),
        ("a path", "../../../etc/passwd".to_owned()),
        ("markup", "<script>alert(1)</script>".to_owned()),
        ("a status-like word", "active ".to_owned()),
        ("a number as text", "1700000000".to_owned()),
        ("just over a Stripe id", "x".repeat(256)),
        ("over the fact limit", "y".repeat(2001)),
        ("very long", "z".repeat(200_000)),
        ("long multibyte", "é".repeat(3000)),
    ]
}

const HUGE_NUMBERS: [&str; 12] = [
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "0",
    "1e300",
    "-1e300",
    "1e400",
    "0.5",
    "253402300800",
    "-210866803201",
];

/// Paths most likely to matter to the service: the envelope, ids, the customer, statuses,
/// periods, owners, items.
const HOT_KEYS: [&str; 36] = [
    "id",
    "type",
    "created",
    "api_version",
    "livemode",
    "data",
    "object",
    "customer",
    "status",
    "items",
    "price",
    "plan",
    "metadata",
    "organizationId",
    "userId",
    "current_period_end",
    "current_period_start",
    "subscription",
    "parent",
    "previous_attributes",
    "org_id",
    "user_id",
    "client_reference_id",
    "lookup_key",
    "currency",
    "quantity",
    "trial_end",
    "cancel_at_period_end",
    "latest_invoice",
    "amount_due",
    // Thin events and EventBridge envelopes.
    "related_object",
    "context",
    "reason",
    "detail",
    "detail-type",
    "source",
];

fn is_hot(pointer: &str) -> bool {
    HOT_KEYS.contains(&last_key(pointer)) || pointer.contains("/metadata/")
}

/// Whether a mutation of `kind` has something to work on at `target`: numbers for huge
/// numbers, strings for odd strings; anything for the rest.
fn suits(kind: usize, target: &Value) -> bool {
    match kind {
        3 => target.is_number(),
        4 | 5 => target.is_string(),
        _ => true,
    }
}

/// Every JSON pointer in `value` but the root's.
fn pointers(value: &Value, at: &str, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match value {
        Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| (k.replace('~', "~0").replace('/', "~1"), v))
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (key, child) in children {
        let path = format!("{at}/{key}");
        out.push(path.clone());
        pointers(child, &path, out);
    }
}

fn last_key(pointer: &str) -> &str {
    pointer.rsplit('/').next().unwrap_or("")
}

/// One mutant: its number, its seed's name, what was done, the exact body, and where it
/// is posted.
struct Mutant {
    number: usize,
    fixture: String,
    mutations: Vec<String>,
    body: Vec<u8>,
    to: To,
}

/// The Stripe event inside `value`: the EventBridge event's `detail` while it is still an
/// object, else `value` itself.
fn stripe_event(value: &mut Value, to: To) -> &mut Value {
    if to == To::EventBridge && value["detail"].is_object() {
        &mut value["detail"]
    } else {
        value
    }
}

/// Builds mutant `number` of `fixture` from the run's `seed`.
fn mutant(seed: u64, number: usize, fixture: &Seed) -> Mutant {
    let mut rng = Rng(seed ^ (number as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut value: Value = serde_json::from_slice(&fixture.body).unwrap();
    // A fresh event id, so that every mutant is a new inbox row (a mutation may still
    // change or remove it).
    stripe_event(&mut value, fixture.to)["id"] = json!(format!("evt_mut_{seed:x}_{number}"));
    let mut raw: Vec<(String, Vec<u8>)> = Vec::new();
    let mut mutations = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let kind = rng.below(KINDS);
        let mut all = Vec::new();
        pointers(&value, "", &mut all);
        // Where this kind of mutation bites, the fields the service reads most often.
        let suitable: Vec<String> = all
            .iter()
            .filter(|p| value.pointer(p).is_some_and(|v| suits(kind, v)))
            .cloned()
            .collect();
        let candidates = if suitable.is_empty() { all } else { suitable };
        if candidates.is_empty() {
            break;
        }
        let hot: Vec<String> = candidates.iter().filter(|p| is_hot(p)).cloned().collect();
        let path = if !hot.is_empty() && rng.below(5) < 3 {
            rng.pick(&hot).clone()
        } else {
            rng.pick(&candidates).clone()
        };
        mutations.push(mutate(
            &mut rng, kind, &mut value, &path, &mut raw, fixture.to,
        ));
    }
    let mut body = serde_json::to_vec(&value).unwrap();
    // Newest first: a later mutation may have wrapped an earlier marker in its own text.
    for (marker, bytes) in raw.into_iter().rev() {
        let marker = serde_json::to_vec(&Value::String(marker)).unwrap();
        if let Some(at) = find(&body, &marker) {
            body.splice(at..at + marker.len(), bytes);
        }
    }
    Mutant {
        number,
        fixture: fixture.name.clone(),
        mutations,
        body,
        to: fixture.to,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How many kinds of mutation [`mutate`] knows.
const KINDS: usize = 9;

/// Applies one mutation of `kind` at `path`; says what it did.
fn mutate(
    rng: &mut Rng,
    kind: usize,
    value: &mut Value,
    path: &str,
    raw: &mut Vec<(String, Vec<u8>)>,
    to: To,
) -> String {
    let target = value
        .pointer_mut(path)
        .expect("a pointer from the value itself");
    match kind {
        0 => {
            let (parent, key) = path.rsplit_once('/').unwrap();
            let key = key.replace("~1", "/").replace("~0", "~");
            // `""` points at the whole document.
            match value.pointer_mut(parent) {
                Some(Value::Object(fields)) => {
                    fields.remove(&key);
                }
                Some(Value::Array(items)) => {
                    items.remove(key.parse::<usize>().unwrap());
                }
                _ => unreachable!("a pointer's parent holds it"),
            }
            format!("removed {path}")
        }
        1 => {
            *target = Value::Null;
            format!("{path} = null")
        }
        2 => {
            let replacement = match target {
                Value::String(_) => rng
                    .pick(&[json!(42), json!(true), json!([]), json!({})])
                    .clone(),
                Value::Number(_) => rng
                    .pick(&[json!("42"), json!(false), json!([1]), json!({"n": 1})])
                    .clone(),
                Value::Bool(_) => rng.pick(&[json!("true"), json!(1), json!(null)]).clone(),
                Value::Object(_) => rng.pick(&[json!([]), json!("object"), json!(7)]).clone(),
                Value::Array(_) => rng.pick(&[json!({}), json!("list"), json!(0)]).clone(),
                Value::Null => rng
                    .pick(&[json!({}), json!([]), json!("null"), json!(0)])
                    .clone(),
            };
            let shown = replacement.to_string();
            *target = replacement;
            format!("{path} = {shown} (wrong type)")
        }
        3 => {
            let number = *rng.pick(&HUGE_NUMBERS);
            // Some do not fit a JSON value (1e400 overflows an f64): spliced in raw.
            let parsed = serde_json::from_str::<Value>(number).ok();
            let exact = parsed.as_ref().map(Value::to_string);
            match parsed {
                Some(parsed) if exact.as_deref() == Some(number) => *target = parsed,
                _ => {
                    let marker = format!("\u{e000}raw{}\u{e000}", raw.len());
                    *target = Value::String(marker.clone());
                    // Spliced in place of the quoted marker, so it stays unquoted.
                    raw.push((marker, number.as_bytes().to_vec()));
                }
            }
            format!("{path} = {number}")
        }
        4 => {
            let strings = odd_strings();
            let (what, text) = rng.pick(&strings);
            *target = Value::String(text.clone());
            format!("{path} = {what}")
        }
        5 => {
            let (what, bytes) = *rng.pick(&RAW_TEXT);
            let marker = format!("\u{e000}raw{}\u{e000}", raw.len());
            *target = Value::String(marker.clone());
            raw.push((marker, bytes.to_vec()));
            format!("{path} = {what}")
        }
        6 => {
            let depth = *rng.pick(&[20usize, 100, 127, 129, 5000]);
            let object = rng.below(2) == 0;
            // Built as text: a value this deep would overflow this test's own stack.
            let inner = serde_json::to_vec(target).unwrap();
            let (open, close): (&[u8], &[u8]) = if object {
                (br#"{"a":"#, b"}")
            } else {
                (b"[", b"]")
            };
            let mut nested = open.repeat(depth);
            nested.extend_from_slice(&inner);
            nested.extend_from_slice(&close.repeat(depth));
            let marker = format!("\u{e000}raw{}\u{e000}", raw.len());
            *target = Value::String(marker.clone());
            raw.push((marker, nested));
            format!(
                "{path} nested {depth} deep in {}",
                if object { "objects" } else { "arrays" }
            )
        }
        7 => {
            let copies = *rng.pick(&[2usize, 100, 2000]);
            let item = std::mem::take(target);
            let size = item.to_string().len();
            // Bounded so the body stays under the 1 MiB limit most of the time (an
            // oversized body is a 413, a case of its own).
            let copies = copies.min((600_000 / size.max(1)).max(1));
            *target = Value::Array(vec![item; copies]);
            format!("{path} repeated {copies} times in an array")
        }
        _ => {
            let mut types: Vec<&str> = HANDLED_TYPES.to_vec();
            types.extend([
                "",
                "customer.",
                "customer.subscription.",
                "invoice",
                ".",
                "charge.succeeded",
                "v1.customer.subscription.updated",
                "v1.invoice.paid",
                "v1.",
                "v2.core.event_destination.ping",
                "v2.core.health.event_generation_failure.resolved",
            ]);
            let event_type = *rng.pick(&types);
            stripe_event(value, to)["type"] = json!(event_type);
            format!("type = {event_type:?} (at {path})")
        }
    }
}

/// Every shared fixture, as a webhook; thin events, as a webhook; and EventBridge envelopes
/// around the thin events and around every eighth fixture.
///
/// The thin events are the fake's (`FakeStripe::thin_event`: shaped as
/// https://docs.stripe.com/api/v2/core/events/object and stripe-node
/// `src/resources/V2/Core/Events.ts`): a subscription the fake holds (fetched), an invoice it
/// does not hold for a connected account (`context`; Stripe answers 404), a v2 type naming
/// nothing (`v2.core.event_destination.ping`) and the health event that requests a sync of
/// every customer. The envelope is `deliveries::envelope_of` (AWS's event structure,
/// https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-events-structure.html, and
/// https://docs.stripe.com/event-destinations/eventbridge).
fn seeds(fake: &FakeStripe, subscription_id: &str) -> Vec<Seed> {
    let fixtures = load();
    let thin = [
        fake.thin_event(
            "v1.customer.subscription.updated",
            Some(("subscription", subscription_id)),
            None,
        ),
        fake.thin_event(
            "v1.invoice.paid",
            Some(("invoice", "in_mut_missing")),
            Some("acct_1MutantContext"),
        ),
        fake.thin_event("v2.core.event_destination.ping", None, None),
        fake.thin_event(
            "v2.core.health.event_generation_failure.resolved",
            None,
            None,
        ),
    ];
    let mut seeds: Vec<Seed> = fixtures
        .iter()
        .map(|f| Seed {
            name: f.file.clone(),
            body: f.body.clone(),
            to: To::Webhook,
        })
        .collect();
    for event in &thin {
        seeds.push(Seed {
            name: format!("thin {}", event["type"]),
            body: serde_json::to_vec(event).unwrap(),
            to: To::Webhook,
        });
    }
    let wrapped = thin
        .iter()
        .map(|event| (format!("thin {}", event["type"]), event.clone()));
    let fixtures_wrapped = fixtures.iter().step_by(8).map(|f| {
        (
            f.file.clone(),
            serde_json::from_slice::<Value>(&f.body).unwrap(),
        )
    });
    for (name, event) in wrapped.chain(fixtures_wrapped) {
        seeds.push(Seed {
            name: format!("EventBridge around {name}"),
            body: serde_json::to_vec(&envelope_of(&event)).unwrap(),
            to: To::EventBridge,
        });
    }
    seeds
}

/// Posts an EventBridge event with the header secret; the status, or `None` when no
/// answer came.
async fn post_eventbridge(client: &reqwest::Client, address: &str, body: &[u8]) -> Option<u16> {
    client
        .post(format!("{address}/webhooks/eventbridge"))
        .header(EB_HEADER, EB_SECRET)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// What `SUBLEDGER_MUTATION_SEED` says, or a fresh seed.
fn seed() -> u64 {
    match std::env::var("SUBLEDGER_MUTATION_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SUBLEDGER_MUTATION_SEED={text:?} is not a u64")),
        Err(_) => uuid::Uuid::new_v4().as_u128() as u64,
    }
}

#[tokio::test]
async fn mutated_fixtures_never_get_a_5xx_and_clean_lifecycles_still_converge() {
    let started = Instant::now();
    let seed = seed();
    let per_fixture: usize = std::env::var("SUBLEDGER_MUTANTS_PER_FIXTURE")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_PER_FIXTURE);
    eprintln!(
        "mutation seed {seed} ({per_fixture} mutants per fixture); reproduce with \
         SUBLEDGER_MUTATION_SEED={seed} cargo test --test integration mutants::"
    );
    // Thin events are fetched: from a fake Stripe that knows one subscription. Its
    // entitlements answer is refused, so a sync never records a summary the lifecycles
    // below do not have (a summary Stripe does not give leaves what is held alone).
    let fake = FakeStripe::start().await;
    fake.fail_always("/v1/entitlements/", 404);
    let sub = fake.add_subscription("cus_mut_thin", "org_mut_thin", "active", "price_pro", 3_600);
    let seeds = seeds(&fake, sub["id"].as_str().unwrap());
    let mutants: Vec<Mutant> = seeds
        .iter()
        .enumerate()
        .flat_map(|(f, fixture)| (0..per_fixture).map(move |k| (f * per_fixture + k, fixture)))
        .map(|(number, fixture)| mutant(seed, number, fixture))
        .collect();

    let (mut settings, db_name, _) = test_settings("mutants");
    settings.stripe_api_base = fake.base_url.clone();
    let dir = scratch("mutants");
    let log = dir.join("serve.log");
    let mut command = serve_command(&settings);
    // A key of neither mode's prefix: events of both modes are processed, as the
    // fixtures hold both.
    command
        .env("STRIPE_SECRET_KEY", "sk_mutants_fake")
        .env("SUBLEDGER_EVENTBRIDGE_SECRET", EB_SECRET)
        .env("SUBLEDGER_EVENTBRIDGE_HEADER", EB_HEADER)
        .env("SUBLEDGER_RECOVERY_INTERVAL_SECS", "0")
        .env("SUBLEDGER_RECONCILE_INTERVAL_SECS", "0");
    let serve = Served::start(command, &log).await;
    let base = serve.address.clone();

    // Every mutant, 8 at a time; what each was answered.
    let client = reqwest::Client::new();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mutant) in mutants.iter().enumerate() {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let (client, base, body) = (client.clone(), base.clone(), mutant.body.clone());
        let to = mutant.to;
        tasks.spawn(async move {
            let _permit = permit;
            let status = match to {
                To::Webhook => post_event(&client, &base, &body).await,
                To::EventBridge => post_eventbridge(&client, &base, &body).await,
            };
            (i, status)
        });
    }
    let mut answered: Vec<Option<u16>> = vec![None; mutants.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, status) = joined.unwrap();
        answered[i] = status;
    }
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for status in &answered {
        *by_status
            .entry(status.map_or("none".to_owned(), |s| s.to_string()))
            .or_default() += 1;
    }
    eprintln!("{} mutants answered {by_status:?}", mutants.len());
    let failed: Vec<(&Mutant, Option<u16>)> = mutants
        .iter()
        .zip(&answered)
        .filter(|(_, status)| status.is_none_or(|s| s >= 500))
        .map(|(m, s)| (m, *s))
        .collect();
    report(seed, &failed, "answered 5xx or not at all");

    // Every mutant that was stored has been tried; none is left retrying, which would be
    // a refused value taken for an outage.
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let untried: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inbox WHERE state = 'pending' AND attempts = 0",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if untried == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{untried} rows never processed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retrying: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, last_error FROM inbox WHERE state = 'pending' AND attempts > 0",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let by_id: HashMap<String, &Mutant> = mutants
        .iter()
        .map(|m| (format!("evt_mut_{seed:x}_{}", m.number), m))
        .collect();
    if !retrying.is_empty() {
        for (event_id, error) in &retrying {
            eprintln!("retrying {event_id}: {error:?}");
        }
        let failed: Vec<(&Mutant, Option<u16>)> = retrying
            .iter()
            .filter_map(|(id, _)| by_id.get(id).map(|m| (*m, Some(200))))
            .collect();
        report(
            seed,
            &failed,
            "left retrying (a permanent failure taken for a transient one)",
        );
        panic!("{} rows are retrying", retrying.len());
    }
    let outcomes: Vec<(String, Option<String>, i64)> =
        sqlx::query_as("SELECT state, outcome, count(*) FROM inbox GROUP BY 1, 2 ORDER BY 1, 2")
            .fetch_all(&pool)
            .await
            .unwrap();
    eprintln!("inbox after the mutants: {outcomes:?}");

    // Still up and well.
    for path in ["/healthz", "/readyz"] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }

    // Clean lifecycles afterwards, shuffled and duplicated, converge to what the domain
    // computes from them in order.
    let sim = simulate(seed, 12, 1_760_000_000);
    let events = shuffle_with_duplicates(&sim.events, seed, 0.2);
    let bodies: Vec<Vec<u8>> = events.iter().map(SimEvent::to_bytes).collect();
    let acked = post_all(std::slice::from_ref(&base), &bodies, 8).await;
    assert_eq!(
        acked.len(),
        bodies.len(),
        "every clean event is acknowledged"
    );
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
    let customers: Vec<String> = sim.truth.iter().map(|t| t.customer_id.clone()).collect();
    let served = answers(&base, &customers).await;
    let catalog =
        Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/catalog.example.toml").as_ref())
            .unwrap();
    for (customer, view) in fold(&sim.events) {
        let mut info = SubscriptionInfo::from_view(&view, 0, view.as_of.unwrap(), &catalog);
        // The API judges access at the time of the read.
        info.resolve(&catalog, chrono::Utc::now());
        let mut info = serde_json::to_value(info).unwrap();
        info.as_object_mut().unwrap().remove("version");
        assert_eq!(
            served[&customer], info,
            "{customer} after the mutants of seed {seed}"
        );
    }

    drop(serve);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains("panicked"), "seed {seed}: {logs}");
    eprintln!(
        "mutation run of seed {seed}: {} mutants in {:.1} s",
        mutants.len(),
        started.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Prints each failing mutant (its seed, fixture and mutations) and writes its body under
/// `target/mutants/seed-<seed>/`; then fails.
fn report(seed: u64, failed: &[(&Mutant, Option<u16>)], what: &str) {
    if failed.is_empty() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/mutants")
        .join(format!("seed-{seed}"));
    std::fs::create_dir_all(&dir).unwrap();
    for (mutant, status) in failed {
        let file = dir.join(format!("mutant-{}.json", mutant.number));
        std::fs::write(&file, &mutant.body).unwrap();
        eprintln!(
            "seed {seed}, mutant {} of {}: {} -> {status:?}; body in {}",
            mutant.number,
            mutant.fixture,
            mutant.mutations.join("; "),
            file.display()
        );
    }
    panic!(
        "{} mutants {what} (seed {seed}; reproduce with SUBLEDGER_MUTATION_SEED={seed})",
        failed.len()
    );
}
