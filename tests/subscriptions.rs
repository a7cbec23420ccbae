//! Subscription keys and products, with API Management's semantics and messages.

use portcullis_testkit::{Response, TestProxy};

use crate::common::Env;

const MISSING: &str = r#"{"statusCode":401,"message":"Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API."}"#;
const INVALID: &str = r#"{"statusCode":401,"message":"Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."}"#;

/// Two APIs (`todo` requires a key, `open` does not), products `starter` (todo) and `gold`
/// (other), scope steps that leave their mark in `X-Scope`, and subscriptions inline and in a
/// file.
fn setup(env: &Env, extra: &str) -> TestProxy {
    let keys = env.dir().join("starter.keys");
    std::fs::write(
        &keys,
        "# id, primary, secondary, state\n\
         file-1, file1primary, file1secondary, active\n\
         file-2, file2primary, , suspended\n",
    )
    .unwrap();
    env.proxy(
        "request",
        &format!(
            r#"
[subscriptions]
starter = "{keys}"

[[product]]
name = "starter"
apis = ["todo"]
  [[product.inbound]]
  set_header = {{ name = "X-Scope", value = "product", action = "append" }}

[[product]]
name = "gold"
apis = ["other"]

[[subscription]]
id = "partner-1"
product = "starter"
primary_key = "partner1primary"
secondary_key = "partner1secondary"

[[subscription]]
id = "gold-1"
product = "gold"
primary_key = "gold1primary"

[[subscription]]
id = "api-only"
scope = {{ api = "todo" }}
primary_key = "apionlyprimary"

[[subscription]]
id = "everything"
scope = {{ all_apis = true }}
primary_key = "everythingprimary"

[[inbound]]
set_header = {{ name = "X-Scope", value = "global", action = "append" }}

[[api]]
name = "todo"
path = "/todo"
backend = "app"
subscription_required = true
  [[api.inbound]]
  set_header = {{ name = "X-Scope", value = "api", action = "append" }}
  [[api.inbound]]
  set_header = {{ name = "X-Subscription", value = "{{subscription.id}}" }}
  [[api.inbound]]
  set_header = {{ name = "X-Product", value = "{{product.name}}" }}

[[api]]
name = "other"
path = "/other"
backend = "app"
subscription_required = true

[[api]]
name = "open"
path = "/open"
backend = "app"
{extra}
"#,
            keys = keys.display()
        ),
    )
}

fn get(env: &Env, proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Response {
    env.client(None).connect(proxy.addr).unwrap().request("GET", path, headers, b"").unwrap()
}

fn with_key(env: &Env, proxy: &TestProxy, path: &str, key: &str) -> Response {
    get(env, proxy, path, &[("Ocp-Apim-Subscription-Key", key)])
}

/// The `X-Scope` values the backend received, in order.
fn scopes(r: &Response) -> Vec<String> {
    r.text().lines().filter_map(|l| l.strip_prefix("X-Scope: ").map(str::to_owned)).collect()
}

#[test]
fn keys_in_the_header_or_the_query_are_checked_and_never_forwarded() {
    let env = Env::new();
    let proxy = setup(&env, "");
    let r = with_key(&env, &proxy, "/todo/items", "partner1primary");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed_header("X-Subscription").as_deref(), Some("partner-1"));
    assert_eq!(r.echoed_header("X-Product").as_deref(), Some("starter"));
    assert_eq!(r.echoed_header("Ocp-Apim-Subscription-Key"), None, "the key is not forwarded");
    // Either key of a subscription; header names are case-insensitive.
    let r = get(&env, &proxy, "/todo/items", &[("ocp-apim-subscription-key", "partner1secondary")]);
    assert_eq!(r.echoed_header("X-Subscription").as_deref(), Some("partner-1"));
    // The query, when the header is absent; the parameter is removed, the others stay.
    let r = get(&env, &proxy, "/todo/items?a=1&subscription-key=file1secondary&b=2", &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("GET /items?a=1&b=2 HTTP/1.1"), "{}", r.text());
    assert_eq!(r.echoed_header("X-Subscription").as_deref(), Some("file-1"));
    // Both: the header wins, and neither reaches the backend.
    let r = get(
        &env,
        &proxy,
        "/todo/items?subscription-key=wrong",
        &[("Ocp-Apim-Subscription-Key", "file1primary")],
    );
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("GET /items HTTP/1.1"), "{}", r.text());
    assert_eq!(r.echoed_header("X-Subscription").as_deref(), Some("file-1"));
}

#[test]
fn refusals_say_missing_or_invalid() {
    let env = Env::new();
    let proxy = setup(&env, "");
    let r = get(&env, &proxy, "/todo/items", &[]);
    assert_eq!((r.status, r.text().as_str()), (401, MISSING));
    assert_eq!(get(&env, &proxy, "/todo/items", &[("Ocp-Apim-Subscription-Key", "")]).text(), MISSING);
    for key in ["nosuchkey", "partner1primar", "partner1primaryx", "file2primary", "gold1primary"] {
        let r = with_key(&env, &proxy, "/todo/items", key);
        assert_eq!((r.status, r.text().as_str()), (401, INVALID), "{key}");
    }
    assert_eq!(get(&env, &proxy, "/todo/items?subscription-key=%zz", &[]).text(), INVALID);
    // An API that needs no key takes none, but a key given must be valid (API Management).
    assert_eq!(get(&env, &proxy, "/open/x", &[]).status, 200);
    assert_eq!(with_key(&env, &proxy, "/open/x", "everythingprimary").status, 200);
    assert_eq!(with_key(&env, &proxy, "/open/x", "partner1primary").text(), INVALID);
    assert_eq!(env.backend.requests(), 2);
}

#[test]
fn scopes_compose_global_product_api() {
    let env = Env::new();
    let proxy = setup(&env, "");
    let r = with_key(&env, &proxy, "/todo/items", "partner1primary");
    assert_eq!(scopes(&r), ["global", "product", "api"]);
    // API and all-APIs subscriptions run no product's steps.
    let r = with_key(&env, &proxy, "/todo/items", "apionlyprimary");
    assert_eq!((r.status, scopes(&r)), (200, vec!["global".to_owned(), "api".to_owned()]));
    assert_eq!(r.echoed_header("X-Subscription").as_deref(), Some("api-only"));
    assert_eq!(r.echoed_header("X-Product"), None);
    let r = with_key(&env, &proxy, "/other/x", "everythingprimary");
    assert_eq!(r.status, 200);
    // A client cannot bring its own subscription headers.
    let r = get(
        &env,
        &proxy,
        "/todo/items",
        &[
            ("Ocp-Apim-Subscription-Key", "apionlyprimary"),
            ("X-Product", "gold"),
            ("X-Subscription", "admin"),
        ],
    );
    assert_eq!(r.echoed_header("X-Product"), None);
    assert_eq!(r.echoed_header("X-Subscription").as_deref(), Some("api-only"));
}

#[test]
fn an_open_product_lets_anonymous_callers_in_under_its_steps() {
    let env = Env::new();
    let proxy = setup(
        &env,
        r#"
[[product]]
name = "free"
apis = ["open"]
subscription_required = false
  [[product.inbound]]
  set_header = { name = "X-Product", value = "{product.name}" }
"#,
    );
    let r = get(&env, &proxy, "/open/x", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed_header("X-Product").as_deref(), Some("free"));
    // An invalid key falls back to the open product too.
    let r = with_key(&env, &proxy, "/open/x", "partner1primary");
    assert_eq!((r.status, r.echoed_header("X-Product").as_deref()), (200, Some("free")));
}

#[test]
fn header_and_query_names_are_per_api() {
    let env = Env::new();
    let proxy = setup(
        &env,
        "subscription_required = true\nsubscription_key_header = \"X-Api-Key\"\nsubscription_key_query = \"key\"",
    );
    assert_eq!(get(&env, &proxy, "/open/x", &[("X-Api-Key", "everythingprimary")]).status, 200);
    let r = get(&env, &proxy, "/open/x?key=everythingprimary&subscription-key=x", &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("GET /x?subscription-key=x HTTP/1.1"), "{}", r.text());
    assert_eq!(with_key(&env, &proxy, "/open/x", "everythingprimary").text(), MISSING);
}

#[test]
fn subscription_files_reload() {
    let env = Env::new();
    let mut proxy = setup(&env, "");
    assert_eq!(with_key(&env, &proxy, "/todo/x", "file3primary").status, 401);
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        env.dir().join("starter.keys"),
        "file-3, file3primary\nfile-1, file1primary, , suspended\n",
    )
    .unwrap();
    proxy.reload(&text).unwrap();
    assert_eq!(with_key(&env, &proxy, "/todo/x", "file3primary").status, 200);
    assert_eq!(with_key(&env, &proxy, "/todo/x", "file1primary").status, 401);
    // A broken file is refused with its line, and the running set stays.
    std::fs::write(env.dir().join("starter.keys"), "file-4, file4primary\nfile-5, bad key\n").unwrap();
    let e = proxy.reload(&text).unwrap_err().to_string();
    assert!(e.contains("starter.keys:2"), "{e}");
    assert_eq!(with_key(&env, &proxy, "/todo/x", "file3primary").status, 200);
    assert_eq!(with_key(&env, &proxy, "/todo/x", "file4primary").status, 401);
}

#[test]
fn the_access_log_names_the_subscription_and_never_the_key() {
    let env = Env::new();
    let proxy = setup(&env, &format!("[server]\n{}", crate::common::access_log_to(env.dir())));
    assert_eq!(with_key(&env, &proxy, "/todo/items", "partner1primary").status, 200);
    assert_eq!(with_key(&env, &proxy, "/todo/nope", "wrongkey").status, 401);
    let line = crate::common::access_line(env.dir(), &["/todo/items"]).expect("a line");
    assert!(line.contains("\"subscription\":\"partner-1\""), "{line}");
    let line = crate::common::access_line(env.dir(), &["/todo/nope"]).expect("a line");
    assert!(line.contains("\"subscription\":\"-\"") && line.contains("\"status\":401"), "{line}");
    let text = std::fs::read_to_string(env.dir().join("access.log")).unwrap();
    assert!(!text.contains("partner1primary") && !text.contains("wrongkey"), "{text}");
}
