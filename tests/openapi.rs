//! APIs imported from OpenAPI documents: a Todo API in JSON and a devices API in YAML 3.1,
//! operations attached by `operationId`, undeclared operations refused, and a broken document
//! reported at its line, at load and on reload (the running rules stay).

use portcullis_testkit::TestProxy;

use crate::common::{Env, binary};

fn data(name: &str) -> String {
    format!("{}/tests/data/openapi/{name}", env!("CARGO_MANIFEST_DIR").trim_end_matches("/crates/portcullis"))
}

fn apis(todo: &str, devices: &str) -> String {
    format!(
        r#"[[api]]
name = "todo"
openapi = "{todo}"
backend = "app"

[[api]]
name = "devices"
openapi = "{devices}"
backend = "app"
  [[api.operation]]
  id = "getTelemetry"
    [[api.operation.inbound]]
    set_header = {{ name = "X-Device", value = "{{route.deviceId}}" }}
"#
    )
}

#[test]
fn operations_and_paths_come_from_the_documents() {
    let env = Env::new();
    let proxy =
        TestProxy::start(env.dir(), &env.config("request", &apis(&data("todo.json"), &data("devices.yaml"))));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let mut status = |method: &str, path: &str| c.request(method, path, &[], b"").unwrap();
    // The path is the first server's (a variable's default filled in).
    for (method, path) in [
        ("GET", "/todo/items"),
        ("POST", "/todo/items"),
        ("GET", "/todo/items/5"),
        ("DELETE", "/todo/items/5"),
    ] {
        let r = status(method, path);
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        let forwarded = format!("{method} {} HTTP/1.1", &path["/todo".len()..]);
        assert!(r.text().starts_with(&forwarded), "the prefix is replaced by the backend's: {}", r.text());
    }
    // Not declared: 404.
    for (method, path) in [
        ("PUT", "/todo/items"),
        ("GET", "/todo/lists"),
        ("PATCH", "/todo/items/5"),
        ("GET", "/devices/d1/firmware"),
    ] {
        assert_eq!(status(method, path).status, 404, "{method} {path}");
    }
    // The step attached by operationId runs there, with the document's path parameter.
    let r = status("GET", "/devices/dev-7/telemetry");
    assert_eq!((r.status, r.echoed_header("X-Device").as_deref()), (200, Some("dev-7")));
    let r = status("PUT", "/devices/dev-7/firmware");
    assert_eq!((r.status, r.echoed_header("X-Device")), (200, None));
}

#[test]
fn a_broken_document_is_located_and_a_reload_keeps_the_running_rules() {
    let env = Env::new();
    let todo = env.dir().join("todo.json");
    std::fs::copy(data("todo.json"), &todo).unwrap();
    let text = env.config("request", &apis(&todo.display().to_string(), &data("devices.yaml")));
    let mut proxy = TestProxy::start(env.dir(), &text);
    // operationId used twice, at line 12 of the document.
    let broken = std::fs::read_to_string(&todo).unwrap().replace("\"createItem\"", "\"listItems\"");
    std::fs::write(&todo, &broken).unwrap();
    let errors = proxy.reload(&text).expect_err("a broken document");
    let all = errors.to_string();
    assert!(
        all.contains("todo.json:13:") && all.contains("operationId \"listItems\" is used twice"),
        "{all}"
    );
    let r = env.client(None).connect(proxy.addr).unwrap().request("POST", "/todo/items", &[], b"").unwrap();
    assert_eq!(r.status, 200, "the running rules stay");
    // `portcullis check` says the same; so for a syntax error, and an unknown operationId.
    std::fs::write(
        &todo,
        "{\n  \"openapi\": \"3.0.0\",\n  \"paths\": {\n    \"/a\": { \"get\": [ }\n  }\n}\n",
    )
    .unwrap();
    let path = env.write_config("p.toml", &text);
    let check = || {
        let out = std::process::Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(check().contains("todo.json:4:"), "{}", check());
    std::fs::copy(data("todo.json"), &todo).unwrap();
    std::fs::write(&path, text.replace("id = \"getTelemetry\"", "id = \"getTelemetryX\"")).unwrap();
    assert!(check().contains("has no operation with operationId \"getTelemetryX\""), "{}", check());
}

/// The access log names the operation by its operationId.
#[test]
fn the_access_log_names_the_operation() {
    let env = Env::new();
    let text = env.config("request", &apis(&data("todo.json"), &data("devices.yaml"))).replace(
        "[[listener]]",
        &format!("[server]\n{}\n\n[[listener]]", crate::common::access_log_to(env.dir())),
    );
    let proxy = portcullis_testkit::ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let r = env.client(None).connect(proxy.addr).unwrap().request("GET", "/todo/items/3", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    let line =
        crate::common::access_line(env.dir(), &["\"path\":\"/todo/items/3\""]).expect("an access line");
    assert!(line.contains("\"operation\":\"getItem\"") && line.contains("\"api\":\"todo\""), "{line}");
}
