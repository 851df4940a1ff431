//! Deterministic Stripe webhook simulator for subledger's integration tests.
//!
//! [`simulate`] plays many customers through realistic Stripe subscription lifecycles (checkout,
//! trials, renewals, failed payments and dunning, pause/resume, cancellation, resubscription) and
//! returns the webhook events Stripe would send, in `created` order, in either the legacy
//! (`2024-06-20`) or the basil (`2025-03-31.basil`) API shape, together with the [`CustomerTruth`]
//! the simulator knows each customer ends in. [`shuffle_with_duplicates`] reorders and re-delivers
//! events the way Stripe's at-least-once, unordered delivery does, and [`sign`] builds the
//! `Stripe-Signature` header for a payload.
//!
//! This is test-only support code. It must never talk to a network, read the clock, the
//! environment or any file, or hold real Stripe ids or secrets: everything it produces comes from
//! the seed, so the same seed always yields byte-identical events. It must never be compiled into
//! the service itself.
#![allow(dead_code)]

use serde_json::{json, Map, Value};
/// Webhooks are signed by the one signer the crate has (checked by a known-header test).
pub use subledger::stripe::signature::sign;

const API_BASIL: &str = "2025-03-31.basil";
const API_LEGACY: &str = "2024-06-20";
const MINUTE: i64 = 60;
const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;
const MIN_EVENTS: usize = 5;
const MAX_EVENTS: usize = 30;
/// Payment attempts Stripe's retry schedule makes on one invoice before giving up.
const MAX_ATTEMPTS: i64 = 4;
const SUB_UPDATED: &str = "customer.subscription.updated";
const SUB_DELETED: &str = "customer.subscription.deleted";

/// One webhook delivery: the Stripe event and the fields a test usually needs from it.
#[derive(Clone, Debug, PartialEq)]
pub struct SimEvent {
    /// `"evt_"` + a suffix unique across the whole simulation.
    pub id: String,
    /// e.g. `"customer.subscription.updated"`.
    pub event_type: String,
    pub customer_id: String,
    /// The event's `created`, unix seconds.
    pub created: i64,
    /// The full Stripe event JSON (`"object": "event"`).
    pub body: Value,
}

impl SimEvent {
    /// The webhook payload: exactly the bytes that get signed and POSTed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).expect("a JSON value always serializes")
    }
}

/// Truth the simulator knows at the end of each customer's lifecycle: what Stripe's newest facts say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerTruth {
    pub customer_id: String,
    pub org_id: String,
    pub user_id: String,
    /// The customer's current subscription: newest non-terminal by subscription `created`, else the newest.
    pub subscription_id: String,
    /// That subscription's final status.
    pub status: String,
    pub price_id: String,
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
    pub basil_shape: bool,
}

#[derive(Clone, Debug)]
pub struct Simulation {
    pub events: Vec<SimEvent>,
    pub truth: Vec<CustomerTruth>,
}

/// Deterministic for a given seed. `customers` independent customers, their lifecycles interleaved
/// in time, events in `created` order (ties keep generation order). `start` = unix seconds of the first event.
pub fn simulate(seed: u64, customers: usize, start: i64) -> Simulation {
    let (events, truth) = simulate_into(seed, customers, start, |event| event);
    Simulation { events, truth }
}

/// [`simulate`]'s events in the same order, each turned into `keep(event)` as soon as its
/// customer's life is simulated: a long soak's simulation holds millions of events, and
/// their JSON values take several times the memory of their bytes.
pub fn simulate_into<T>(
    seed: u64,
    customers: usize,
    start: i64,
    mut keep: impl FnMut(SimEvent) -> T,
) -> (Vec<T>, Vec<CustomerTruth>) {
    let mut rng = Rng(seed);
    let mut ids = Ids(Rng(rng.next_u64()), 0);
    let org_base = 1_000 * (1 + rng.below(1_000_000));
    // Customers check out within two days of each other; lifecycles last weeks to years.
    let offsets: Vec<i64> = (0..customers).map(|_| rng.range(0, 2 * DAY)).collect();
    let first = offsets.iter().copied().min().unwrap_or(0);
    let mut events = Vec::new();
    let mut truth = Vec::with_capacity(customers);
    for (i, offset) in offsets.iter().enumerate() {
        let (life_rng, n) = (Rng(rng.next_u64()), org_base + i as u64);
        let mut life = Life::new(life_rng, &mut ids, start + offset - first, n);
        life.run();
        truth.push(life.truth());
        events.extend(life.events.drain(..).map(|e| (e.created, keep(e))));
    }
    events.sort_by_key(|(created, _)| *created); // stable: ties keep generation order
    (events.into_iter().map(|(_, kept)| kept).collect(), truth)
}

/// Deterministic shuffle of `events` with duplicates: every event appears at least once; about `dup_rate`
/// (0.0..1.0) of them appear a second time at a random later-or-earlier position (same id, identical bytes).
pub fn shuffle_with_duplicates(events: &[SimEvent], seed: u64, dup_rate: f64) -> Vec<SimEvent> {
    let mut rng = Rng(seed ^ 0x5EED_D0D0_CAFE_F00D);
    let rate = dup_rate.clamp(0.0, 1.0);
    let mut out = events.to_vec();
    for event in events {
        if rng.chance(rate) {
            out.push(event.clone());
        }
    }
    for i in (1..out.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        out.swap(i, j);
    }
    out
}

/// splitmix64: tiny, fast and good enough to drive a test simulation.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        debug_assert!(lo <= hi);
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn weighted<T: Copy>(&mut self, options: &[(T, u64)]) -> Option<T> {
        let mut roll = self.below(options.iter().map(|(_, w)| w).sum::<u64>().max(1));
        for &(option, weight) in options {
            if roll < weight {
                return Some(option);
            }
            roll -= weight;
        }
        None
    }
}

/// Stripe-looking object ids: prefix, 11 random base62 characters, then a base62 sequence number
/// that makes every id of a simulation unique.
struct Ids(Rng, u64);

impl Ids {
    fn make(&mut self, prefix: &str) -> String {
        self.1 += 1;
        let random = base62(self.0.next_u64(), 11);
        format!("{prefix}_{random}{}", base62(self.1, 6))
    }
}

/// `n` as exactly `width` base62 digits (the high digits are dropped if it does not fit).
fn base62(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut digits = vec![b'0'; width];
    for digit in digits.iter_mut().rev() {
        *digit = DIGITS[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits).expect("base62 digits are ASCII")
}

struct Price {
    id: &'static str,
    product: &'static str,
    unit_amount: i64,
}

#[rustfmt::skip]
const PRICES: [Price; 3] = [
    Price { id: "price_basic_monthly", product: "prod_basic", unit_amount: 900 },
    Price { id: "price_pro_monthly", product: "prod_pro", unit_amount: 2_900 },
    Price { id: "price_pro_yearly", product: "prod_pro", unit_amount: 29_000 },
];

impl Price {
    /// `basic_monthly` for `price_basic_monthly`.
    fn lookup_key(&self) -> &'static str {
        self.id.trim_start_matches("price_")
    }

    fn yearly(&self) -> bool {
        self.id.ends_with("yearly")
    }

    /// Billing periods are 30 days (monthly) or 365 days (yearly).
    fn period(&self) -> i64 {
        if self.yearly() {
            365 * DAY
        } else {
            30 * DAY
        }
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id, "object": "price", "active": true, "currency": "usd", "livemode": false,
            "product": self.product, "lookup_key": self.lookup_key(), "type": "recurring",
            "unit_amount": self.unit_amount,
            "recurring": { "interval": if self.yearly() { "year" } else { "month" }, "interval_count": 1, "usage_type": "licensed" },
        })
    }
}

/// The simulator's own state of one subscription; rendered into each snapshot it emits.
struct Sub {
    id: String,
    item: String,
    created: i64,
    price: &'static Price,
    status: &'static str,
    period: (i64, i64),
    /// `cancel_at` is the period end while this is set.
    cancel_at_period_end: bool,
    canceled_at: Option<i64>,
    ended_at: Option<i64>,
    trial: Option<(i64, i64)>,
    latest_invoice: Option<String>,
    has_payment_method: bool,
    /// `customer.subscription.trial_will_end` was sent.
    trial_warned: bool,
    /// The last snapshot emitted and its event `created`.
    last: Option<(i64, Value)>,
}

#[derive(Default)]
struct Invoice {
    /// `None` for the preview Stripe sends as `invoice.upcoming`.
    id: Option<String>,
    subscription: String,
    line: String,
    payment_intent: Option<String>,
    charge: Option<String>,
    created: i64,
    status: &'static str,
    billing_reason: &'static str,
    amount: i64,
    attempts: i64,
    next_attempt: Option<i64>,
    /// Stripe's invoice period: for a renewal, the period that just ended.
    period: (i64, i64),
    /// The subscription period the line item bills.
    line_period: (i64, i64),
}

/// One move of the random walk; each resolves into a status the walk can continue from.
#[derive(Clone, Copy, Debug)]
enum Step {
    Renew { fail: bool },
    TrialWillEnd,
    TrialEnd { fail: bool },
    ChangePrice,
    CancelAtPeriodEnd,
    CancelNow,
    Resume,
    PayLate,
    Resubscribe,
}

impl Step {
    /// Upper bound on the events the step emits, so a lifecycle never exceeds its cap.
    fn max_events(self) -> usize {
        // A failing collection: up to 4 × (payment_intent + invoice), past_due, then 2 to close.
        const DUNNING: usize = 11;
        match self {
            Step::Renew { fail: false } => 5,
            Step::TrialEnd { fail: false } => 4,
            Step::Renew { fail: true } => 2 + DUNNING,
            Step::TrialEnd { fail: true } => 1 + DUNNING,
            Step::TrialWillEnd | Step::ChangePrice | Step::CancelNow => 1,
            Step::CancelAtPeriodEnd => 8,
            Step::Resume | Step::PayLate => 4,
            Step::Resubscribe => 6,
        }
    }
}

/// One customer's lifecycle being generated.
struct Life<'a> {
    rng: Rng,
    ids: &'a mut Ids,
    now: i64,
    basil: bool,
    customer: String,
    org: String,
    user: String,
    subs: Vec<Sub>,
    cur: usize,
    cap: usize,
    /// The invoice an `unpaid` subscription still owes.
    open_invoice: Option<Invoice>,
    events: Vec<SimEvent>,
}

impl<'a> Life<'a> {
    fn new(mut rng: Rng, ids: &'a mut Ids, start: i64, n: u64) -> Self {
        let basil = rng.chance(0.5);
        let cap = rng.range(12, MAX_EVENTS as i64) as usize;
        let customer = ids.make("cus");
        Life {
            rng,
            ids,
            now: start,
            basil,
            customer,
            org: format!("org_{n}"),
            user: format!("user_{n}"),
            subs: Vec::new(),
            cur: 0,
            cap,
            open_invoice: None,
            events: Vec::new(),
        }
    }

    fn run(&mut self) {
        let trial = self.rng.chance(0.35);
        self.checkout(trial);
        loop {
            let len = self.events.len();
            if len >= MIN_EVENTS && self.rng.chance(0.1) {
                break;
            }
            let fitting: Vec<(Step, u64)> = self
                .options()
                .into_iter()
                .filter(|(step, _)| len + step.max_events() <= self.cap)
                .collect();
            match self.rng.weighted(&fitting) {
                Some(step) => self.apply(step),
                None => break,
            }
        }
        debug_assert!((MIN_EVENTS..=MAX_EVENTS).contains(&self.events.len()));
    }

    fn options(&self) -> Vec<(Step, u64)> {
        let sub = &self.subs[self.cur];
        let room = self.room();
        match sub.status {
            "trialing" if !sub.trial_warned => vec![(Step::TrialWillEnd, 1)],
            "trialing" => vec![
                (Step::TrialEnd { fail: false }, 4),
                (Step::TrialEnd { fail: true }, 1),
            ],
            "active" => {
                let mut options = vec![
                    (Step::Renew { fail: false }, 8),
                    (Step::Renew { fail: true }, 2),
                ];
                if room > 6 * HOUR {
                    options.extend([(Step::CancelAtPeriodEnd, 2), (Step::CancelNow, 1)]);
                    if !sub.price.yearly() {
                        options.push((Step::ChangePrice, 1));
                    }
                }
                options
            }
            "paused" => vec![(Step::Resume, 3), (Step::CancelNow, 1)],
            "unpaid" if room > 2 * HOUR => vec![(Step::PayLate, 2), (Step::CancelNow, 2)],
            "unpaid" => vec![(Step::CancelNow, 1)],
            "canceled" if self.subs.len() < 3 => vec![(Step::Resubscribe, 1)],
            _ => Vec::new(),
        }
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Renew { fail } => self.renew(fail),
            Step::TrialWillEnd => {
                // Same snapshot as the trialing state, three days before the trial ends.
                let sub = &mut self.subs[self.cur];
                sub.trial_warned = true;
                self.now = sub.trial.expect("a trialing subscription").1 - 3 * DAY;
                self.emit_sub(self.cur, self.now, "customer.subscription.trial_will_end");
            }
            Step::TrialEnd { fail } => self.trial_end(fail),
            Step::ChangePrice => {
                self.now = self.later(HOUR, 7 * DAY);
                let sub = &mut self.subs[self.cur];
                let current = sub.price.id;
                sub.price = PRICES
                    .iter()
                    .find(|p| !p.yearly() && p.id != current)
                    .unwrap();
                self.emit_sub(self.cur, self.now, SUB_UPDATED);
            }
            Step::CancelAtPeriodEnd => self.cancel_at_period_end(),
            Step::CancelNow => {
                self.now = self.later(HOUR, 5 * DAY);
                self.open_invoice = None;
                self.end_sub(self.cur, self.now);
                self.emit_sub(self.cur, self.now, SUB_DELETED);
            }
            Step::Resume => {
                // The customer adds a card and the subscription is resumed with a fresh cycle.
                let t = self.later(HOUR, 10 * DAY);
                self.now = t;
                let sub = &mut self.subs[self.cur];
                sub.has_payment_method = true;
                sub.status = "active";
                sub.period = (t, t + sub.price.period());
                let amount = sub.price.unit_amount;
                let invoice = self.new_invoice("subscription_update", (t, t), amount);
                self.emit_sub(self.cur, t, "customer.subscription.resumed");
                let paid_at = t + self.rng.range(1, 5);
                self.collect(invoice, paid_at, false);
            }
            Step::PayLate => {
                self.now = self.later(HOUR, 5 * DAY);
                if let Some(invoice) = self.open_invoice.take() {
                    self.pay(invoice);
                }
            }
            Step::Resubscribe => {
                self.now += self.rng.range(DAY, 45 * DAY);
                self.checkout(false);
            }
        }
    }

    /// Checkout Session in subscription mode: a new subscription, its first invoice, the session.
    fn checkout(&mut self, trial: bool) {
        let t = self.now;
        let price = self.rng.pick(&PRICES);
        let has_payment_method = !trial || self.rng.chance(0.6);
        let (status, period, trial_span) = if trial {
            let end = t + *self.rng.pick(&[7, 14]) * DAY;
            ("trialing", (t, end), Some((t, end)))
        } else {
            ("incomplete", (t, t + price.period()), None)
        };
        self.subs.push(Sub {
            id: self.ids.make("sub"),
            item: self.ids.make("si"),
            created: t,
            price,
            status,
            period,
            cancel_at_period_end: false,
            canceled_at: None,
            ended_at: None,
            trial: trial_span,
            latest_invoice: None,
            has_payment_method,
            trial_warned: false,
            last: None,
        });
        self.cur = self.subs.len() - 1;
        let amount = if trial { 0 } else { price.unit_amount };
        let invoice = self.new_invoice("subscription_create", (t, t), amount);
        let invoice_id = invoice.id.clone();
        self.emit_sub(self.cur, t, "customer.subscription.created");
        // Paying the first invoice moves `incomplete` to `active` in the same second.
        self.pay(invoice);
        let session_created = t - self.rng.range(MINUTE, 15 * MINUTE);
        let session = json!({
            "id": self.ids.make("cs_test"), "object": "checkout.session", "mode": "subscription",
            "status": "complete", "payment_status": if trial { "no_payment_required" } else { "paid" },
            "customer": self.customer, "subscription": self.subs[self.cur].id,
            "client_reference_id": self.org, "metadata": self.metadata(), "invoice": invoice_id,
            "amount_total": amount, "currency": "usd", "livemode": false,
            "created": session_created, "expires_at": session_created + DAY,
            "customer_details": { "email": format!("{}@example.com", self.user) },
        });
        let completed_at = t + self.rng.range(0, 1);
        self.emit_at(completed_at, "checkout.session.completed", session, None);
    }

    /// A billing cycle: `invoice.upcoming` a week ahead, the new period, then the payment.
    fn renew(&mut self, fail: bool) {
        let sub = &self.subs[self.cur];
        let (start, end) = sub.period;
        let next = (end, end + sub.price.period());
        let (amount, sub_id) = (sub.price.unit_amount, sub.id.clone());
        if end - 7 * DAY > self.now {
            let preview = Invoice {
                subscription: sub_id,
                line: self.ids.make("il_tmp"),
                created: end,
                status: "draft",
                billing_reason: "upcoming",
                amount,
                next_attempt: Some(end + HOUR),
                period: (start, end),
                line_period: next,
                ..Invoice::default()
            };
            let object = self.invoice_json(&preview);
            self.emit_at(end - 7 * DAY, "invoice.upcoming", object, None);
        }
        self.now = end.max(self.now + 1);
        self.subs[self.cur].period = next;
        let invoice = self.new_invoice("subscription_cycle", (start, end), amount);
        self.emit_sub(self.cur, self.now, SUB_UPDATED);
        self.collect(invoice, self.now + HOUR, fail);
    }

    /// Trial ends: the first paid cycle or, with no payment method on file, `paused`
    /// (trial_settings.end_behavior.missing_payment_method = pause).
    fn trial_end(&mut self, fail: bool) {
        let (trial_start, end) = self.subs[self.cur].trial.expect("a trialing subscription");
        self.now = end;
        let sub = &mut self.subs[self.cur];
        if !sub.has_payment_method {
            sub.status = "paused";
            self.emit_sub(self.cur, end, "customer.subscription.paused");
            return;
        }
        sub.status = "active";
        sub.period = (end, end + sub.price.period());
        let amount = sub.price.unit_amount;
        let invoice = self.new_invoice("subscription_cycle", (trial_start, end), amount);
        self.emit_sub(self.cur, end, SUB_UPDATED);
        self.collect(invoice, end + HOUR, fail);
    }

    /// Cancel at period end; then the customer changes their mind, buys a new subscription
    /// before the old one runs out, or the subscription ends with the period.
    fn cancel_at_period_end(&mut self) {
        let t = self.later(HOUR, 10 * DAY);
        self.now = t;
        let sub = &mut self.subs[self.cur];
        let end = sub.period.1;
        sub.cancel_at_period_end = true;
        sub.canceled_at = Some(t);
        self.emit_sub(self.cur, t, SUB_UPDATED);
        let roll = self.rng.below(100);
        let room = self.room() > HOUR;
        if roll < 20 && room {
            self.now = self.later(HOUR, 5 * DAY);
            let sub = &mut self.subs[self.cur];
            sub.cancel_at_period_end = false;
            sub.canceled_at = None;
            self.emit_sub(self.cur, self.now, SUB_UPDATED);
        } else if roll < 35 && room && self.subs.len() < 3 {
            // The old subscription's deletion lands after the new one's first events.
            let old = self.cur;
            self.now = self.later(HOUR, 5 * DAY);
            self.checkout(false);
            self.end_sub(old, end);
            self.emit_sub(old, end, SUB_DELETED);
        } else {
            self.now = end;
            self.end_sub(self.cur, end);
            self.emit_sub(self.cur, end, SUB_DELETED);
        }
    }

    /// Charges `invoice` at `at`; when `fail`, 1 to 4 attempts fail (active → past_due) and the
    /// dunning ends in recovery, `unpaid`, or cancellation with the invoice marked uncollectible.
    fn collect(&mut self, mut invoice: Invoice, at: i64, fail: bool) {
        self.now = at;
        let failures = if fail {
            self.rng.range(1, MAX_ATTEMPTS)
        } else {
            0
        };
        for attempt in 1..=failures {
            invoice.attempts = attempt;
            invoice.charge = Some(self.ids.make("ch"));
            let retry_at = self.now + self.rng.range(2 * DAY, 4 * DAY);
            invoice.next_attempt = (attempt < MAX_ATTEMPTS).then_some(retry_at);
            let payment_intent = self.pi_json(&invoice, false);
            self.emit("payment_intent.payment_failed", payment_intent);
            self.emit("invoice.payment_failed", self.invoice_json(&invoice));
            if self.subs[self.cur].status == "active" {
                self.subs[self.cur].status = "past_due";
                self.emit_sub(self.cur, self.now, SUB_UPDATED);
            }
            if let Some(next) = invoice.next_attempt {
                self.now = next;
            }
        }
        if failures < MAX_ATTEMPTS {
            self.pay(invoice);
        } else if self.rng.chance(0.5) {
            self.subs[self.cur].status = "unpaid";
            self.emit_sub(self.cur, self.now, SUB_UPDATED);
            self.open_invoice = Some(invoice);
        } else {
            self.end_sub(self.cur, self.now);
            self.emit_sub(self.cur, self.now, SUB_DELETED);
            invoice.status = "uncollectible";
            self.emit("invoice.marked_uncollectible", self.invoice_json(&invoice));
        }
    }

    /// A successful payment of `invoice` now; reactivates an incomplete/past_due/unpaid subscription.
    fn pay(&mut self, mut invoice: Invoice) {
        invoice.status = "paid";
        invoice.next_attempt = None;
        if invoice.payment_intent.is_some() {
            invoice.attempts += 1;
            invoice.charge = Some(self.ids.make("ch"));
            self.emit("payment_intent.succeeded", self.pi_json(&invoice, true));
        }
        self.emit("invoice.paid", self.invoice_json(&invoice));
        self.emit("invoice.payment_succeeded", self.invoice_json(&invoice));
        let sub = &mut self.subs[self.cur];
        if matches!(sub.status, "incomplete" | "past_due" | "unpaid") {
            sub.status = "active";
            self.emit_sub(self.cur, self.now, SUB_UPDATED);
        }
    }

    fn end_sub(&mut self, idx: usize, t: i64) {
        let sub = &mut self.subs[idx];
        sub.status = "canceled";
        sub.canceled_at = sub.canceled_at.or(Some(t));
        sub.ended_at = Some(t);
    }

    /// A new open invoice, created now, for the current period of the current subscription,
    /// which it becomes the `latest_invoice` of.
    fn new_invoice(&mut self, reason: &'static str, period: (i64, i64), amount: i64) -> Invoice {
        let id = self.ids.make("in");
        let sub = &mut self.subs[self.cur];
        sub.latest_invoice = Some(id.clone());
        Invoice {
            id: Some(id),
            subscription: sub.id.clone(),
            line: self.ids.make("il"),
            payment_intent: (amount > 0).then(|| self.ids.make("pi")),
            created: self.now,
            status: "open",
            billing_reason: reason,
            amount,
            next_attempt: Some(self.now + HOUR),
            period,
            line_period: sub.period,
            ..Invoice::default()
        }
    }

    /// Seconds left before the hour preceding the current period's end.
    fn room(&self) -> i64 {
        self.subs[self.cur].period.1 - HOUR - self.now
    }

    /// A time `lo..=hi` seconds from now, kept an hour before the period ends while the current
    /// subscription still renews, so that the renewal stays the next thing to happen to it.
    fn later(&mut self, lo: i64, hi: i64) -> i64 {
        let sub = &self.subs[self.cur];
        let (lo, mut hi) = (self.now + lo, self.now + hi);
        if matches!(sub.status, "active" | "past_due" | "unpaid") {
            hi = hi.min(sub.period.1 - HOUR);
        }
        self.rng.range(lo, hi.max(lo))
    }

    /// Emits a `customer.subscription.*` event with subscription `idx`'s current state at `t`.
    /// Snapshots of one subscription never share a second, except the checkout incomplete → active
    /// pair; the walk already spaces them, this only guards the rule.
    fn emit_sub(&mut self, idx: usize, t: i64, event_type: &str) {
        let snapshot = self.sub_json(&self.subs[idx]);
        let mut t = t;
        let mut previous = None;
        if let Some((last_t, old)) = self.subs[idx].last.take() {
            let checkout_pair = old["status"] == "incomplete" && snapshot["status"] == "active";
            if t <= last_t && !(checkout_pair && t == last_t) {
                t = last_t + 1;
                self.now = self.now.max(t);
            }
            if event_type == SUB_UPDATED {
                previous = Some(changed_fields(&old, &snapshot));
            }
        }
        self.subs[idx].last = Some((t, snapshot.clone()));
        self.emit_at(t, event_type, snapshot, previous);
    }

    fn emit(&mut self, event_type: &str, object: Value) {
        self.emit_at(self.now, event_type, object, None);
    }

    fn emit_at(&mut self, t: i64, event_type: &str, object: Value, previous: Option<Value>) {
        let id = self.ids.make("evt");
        let mut data = json!({ "object": object });
        if let Some(previous) = previous {
            data["previous_attributes"] = previous;
        }
        let body = json!({
            "id": id, "object": "event", "api_version": if self.basil { API_BASIL } else { API_LEGACY },
            "created": t, "livemode": false, "pending_webhooks": 1,
            "request": { "id": null, "idempotency_key": null },
            "type": event_type, "data": data,
        });
        self.events.push(SimEvent {
            id,
            event_type: event_type.to_owned(),
            customer_id: self.customer.clone(),
            created: t,
            body,
        });
    }

    fn metadata(&self) -> Value {
        json!({ "organizationId": self.org, "userId": self.user })
    }

    /// The subscription as Stripe renders it in this customer's API version.
    fn sub_json(&self, sub: &Sub) -> Value {
        let (start, end) = sub.period;
        let mut item = json!({
            "id": sub.item, "object": "subscription_item", "created": sub.created, "metadata": {},
            "price": sub.price.json(), "quantity": 1, "subscription": sub.id,
        });
        let mut object = json!({
            "id": sub.id, "object": "subscription", "customer": self.customer, "status": sub.status,
            "created": sub.created, "start_date": sub.created,
            "cancel_at_period_end": sub.cancel_at_period_end, "cancel_at": sub.cancel_at_period_end.then_some(end),
            "canceled_at": sub.canceled_at, "ended_at": sub.ended_at,
            "trial_start": sub.trial.map(|t| t.0), "trial_end": sub.trial.map(|t| t.1),
            "metadata": self.metadata(), "latest_invoice": sub.latest_invoice,
            "collection_method": "charge_automatically", "currency": "usd", "livemode": false,
            "pause_collection": null,
        });
        let holder = if self.basil { &mut item } else { &mut object };
        holder["current_period_start"] = start.into();
        holder["current_period_end"] = end.into();
        object["items"] = json!({
            "object": "list", "data": [item], "has_more": false, "total_count": 1,
            "url": format!("/v1/subscription_items?subscription={}", sub.id),
        });
        object
    }

    fn invoice_json(&self, invoice: &Invoice) -> Value {
        let paid = invoice.status == "paid";
        let mut object = json!({
            "object": "invoice", "customer": self.customer, "status": invoice.status,
            "attempt_count": invoice.attempts, "attempted": invoice.attempts > 0,
            "next_payment_attempt": invoice.next_attempt, "created": invoice.created,
            "period_start": invoice.period.0, "period_end": invoice.period.1,
            "amount_due": invoice.amount, "amount_paid": if paid { invoice.amount } else { 0 },
            "amount_remaining": if paid { 0 } else { invoice.amount }, "currency": "usd",
            "billing_reason": invoice.billing_reason, "collection_method": "charge_automatically",
            "livemode": false,
            "lines": {
                "object": "list", "has_more": false, "total_count": 1,
                "data": [{
                    "id": invoice.line, "object": "line_item", "amount": invoice.amount, "currency": "usd",
                    "period": { "start": invoice.line_period.0, "end": invoice.line_period.1 },
                }],
            },
        });
        if let Some(id) = &invoice.id {
            object["id"] = id.as_str().into();
        }
        if self.basil {
            object["parent"] = json!({
                "type": "subscription_details", "quote_details": null,
                "subscription_details": { "subscription": invoice.subscription, "metadata": self.metadata() },
            });
        } else {
            object["subscription"] = invoice.subscription.as_str().into();
            object["paid"] = paid.into();
            object["charge"] = invoice.charge.clone().into();
            object["payment_intent"] = invoice.payment_intent.clone().into();
        }
        object
    }

    /// The invoice's PaymentIntent. Basil removed `PaymentIntent.invoice` (as in Stripe's real
    /// 2025-04-30.basil payloads), so only the legacy shape links it back to the invoice.
    fn pi_json(&self, invoice: &Invoice, succeeded: bool) -> Value {
        let error = (!succeeded).then(|| {
            json!({ "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
                    "message": "Your card has insufficient funds." })
        });
        let mut object = json!({
            "id": invoice.payment_intent, "object": "payment_intent", "amount": invoice.amount,
            "currency": "usd", "customer": self.customer,
            "status": if succeeded { "succeeded" } else { "requires_payment_method" },
            "created": invoice.created, "latest_charge": invoice.charge,
            "last_payment_error": error, "livemode": false,
        });
        if !self.basil {
            object["invoice"] = invoice.id.clone().into();
        }
        object
    }

    fn truth(&self) -> CustomerTruth {
        // `subs` is in `created` order: the newest non-terminal one, else the newest.
        let live = |s: &&Sub| !matches!(s.status, "canceled" | "incomplete_expired");
        let sub = self
            .subs
            .iter()
            .rev()
            .find(live)
            .or(self.subs.last())
            .expect("every customer checks out");
        CustomerTruth {
            customer_id: self.customer.clone(),
            org_id: self.org.clone(),
            user_id: self.user.clone(),
            subscription_id: sub.id.clone(),
            status: sub.status.to_owned(),
            price_id: sub.price.id.to_owned(),
            current_period_end: sub.period.1,
            cancel_at_period_end: sub.cancel_at_period_end,
            basil_shape: self.basil,
        }
    }
}

/// `previous_attributes` of an update: the old value of every top-level field that changed.
fn changed_fields(old: &Value, new: &Value) -> Value {
    let changed: Map<String, Value> = old
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, value)| new.get(key.as_str()) != Some(*value))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    Value::Object(changed)
}
