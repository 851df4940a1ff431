// subledger's TypeScript client: the entitlement reads, the feature check, a customer's
// subscription, and the verifier for subledger's signed notifications.
//
// Every type here comes from the OpenAPI document (`src/schema.ts` is generated from
// `docs/openapi.json` by openapi-typescript; the test command regenerates it and fails on
// any difference), so a change to an answer's shape on the server is a type error here.
// It never caches and never retries: an answer is as fresh as the server's, and what to do
// about a 503 is the caller's decision.

import type { components } from "./schema.js";

export type Entitlement = components["schemas"]["Entitlement"];
export type FeatureAccess = components["schemas"]["FeatureAccess"];
export type SubscriptionInfo = components["schemas"]["SubscriptionInfo"];
export type ErrorBody = components["schemas"]["ErrorBody"];
export type { components, paths } from "./schema.js";
export { verifyNotification, NotificationVerificationError } from "./webhooks.js";
export type { VerifyOptions } from "./webhooks.js";

/** A non-2xx answer: its status and the `error.code` of its `ErrorBody`. */
export class SubledgerError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "SubledgerError";
  }
}

export interface ClientOptions {
  /** Where subledger listens, e.g. `http://127.0.0.1:8080`. */
  baseUrl: string;
  /** `SUBLEDGER_API_TOKEN` (or an org-scoped token, for that org's entitlements only). */
  token: string;
  /** A `fetch` to use instead of the global one (tests, proxies). */
  fetch?: typeof fetch;
}

export class Subledger {
  private readonly baseUrl: string;
  private readonly token: string;
  private readonly fetch: typeof fetch;

  constructor(options: ClientOptions) {
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.token = options.token;
    this.fetch = options.fetch ?? globalThis.fetch;
  }

  /** What an org may use now (`access: false`, status `none` for an org never seen). */
  entitlements(org: string): Promise<Entitlement> {
    return this.get<Entitlement>(`/v1/orgs/${segment(org)}/entitlements`);
  }

  /** What a user may use now. */
  userEntitlements(user: string): Promise<Entitlement> {
    return this.get<Entitlement>(`/v1/users/${segment(user)}/entitlements`);
  }

  /** One feature of an org's entitlement, with its plan and end of access. */
  feature(org: string, feature: string): Promise<FeatureAccess> {
    return this.get<FeatureAccess>(
      `/v1/orgs/${segment(org)}/entitlements/${segment(feature)}`,
    );
  }

  /** May `org` use `feature` now? */
  async can(org: string, feature: string): Promise<boolean> {
    return (await this.feature(org, feature)).access;
  }

  /** May `user` use `feature` now? */
  async userCan(user: string, feature: string): Promise<boolean> {
    const answer = await this.get<FeatureAccess>(
      `/v1/users/${segment(user)}/entitlements/${segment(feature)}`,
    );
    return answer.access;
  }

  /** A Stripe customer's subscription, or `null` for a customer subledger never saw. */
  async subscription(customer: string): Promise<SubscriptionInfo | null> {
    try {
      return await this.get<SubscriptionInfo>(
        `/v1/customers/${segment(customer)}/subscription`,
      );
    } catch (error) {
      if (error instanceof SubledgerError && error.status === 404) return null;
      throw error;
    }
  }

  private async get<T>(path: string): Promise<T> {
    const response = await this.fetch(`${this.baseUrl}${path}`, {
      headers: { authorization: `Bearer ${this.token}`, accept: "application/json" },
    });
    if (!response.ok) {
      let code = "unknown";
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = (await response.json()) as ErrorBody;
        code = body.error.code;
        message = body.error.message;
      } catch {
        // Not an ErrorBody (a proxy's page): the status says enough.
      }
      throw new SubledgerError(response.status, code, message);
    }
    return (await response.json()) as T;
  }
}

/** A path segment, percent-encoded (ids are `[A-Za-z0-9_-]`, features may hold `:`, `.`). */
function segment(value: string): string {
  return encodeURIComponent(value);
}
