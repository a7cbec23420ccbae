//! APIs from OpenAPI documents (Swagger 2.0, OpenAPI 3.0 and 3.1; JSON or YAML): the operations
//! (method and path template, `operationId`) and the API's path (from `servers` or `basePath`).
//! The document is read with positions, so that what is wrong in it is reported at its line.

use saphyr::{LoadableYamlNode, MarkedYaml, YamlData};
use saphyr_parser::{Event, Parser};

/// Largest document read.
pub const MAX_DOCUMENT: usize = 8 << 20;
/// Deepest nesting of mappings and sequences accepted.
const MAX_DEPTH: usize = 64;
/// Longest server URL, its variables filled in.
const MAX_URL: usize = 2048;
/// Most operations one document may declare.
const MAX_OPERATIONS: usize = 10_000;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// What the proxy takes from a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The API's path from the first server's URL (3.x) or `basePath` (2.0), when there is one.
    pub base_path: Option<String>,
    pub operations: Vec<Imported>,
}

/// One operation of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Upper case.
    pub method: String,
    /// The path template as written (`/devices/{deviceId}/telemetry`).
    pub path: String,
    pub id: Option<String>,
    /// Where it is declared (1-based).
    pub line: u32,
    pub column: u32,
}

/// What is wrong with a document, and where (1-based; 0 when it is about the whole document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

fn error_at(node: &MarkedYaml<'_>, message: impl Into<String>) -> DocumentError {
    DocumentError {
        line: node.span.start.line() as u32,
        column: node.span.start.col() as u32 + 1,
        message: message.into(),
    }
}

fn get<'a, 'i>(node: &'a MarkedYaml<'i>, key: &str) -> Option<&'a MarkedYaml<'i>> {
    node.data.as_mapping_get(key)
}

fn string<'a>(node: &'a MarkedYaml<'_>, what: &str) -> Result<&'a str, DocumentError> {
    node.data.as_str().ok_or_else(|| error_at(node, format!("{what} must be a string")))
}

/// The path of a server URL (`https://host/v1` → `/v1`, `/v1` → `/v1`), its `{variables}`
/// replaced by their defaults.
fn server_path(server: &MarkedYaml<'_>) -> Result<Option<String>, DocumentError> {
    let Some(url) = get(server, "url") else { return Ok(None) };
    let mut url = string(url, "servers[0].url")?.to_owned();
    if let Some(vars) = get(server, "variables").and_then(|v| v.data.as_mapping()) {
        for (name, var) in vars.iter() {
            let (Some(name), Some(default)) =
                (name.data.as_str(), get(var, "default").and_then(|d| d.data.as_str()))
            else {
                continue;
            };
            url = url.replace(&format!("{{{name}}}"), default);
            // Defaults that name other variables could grow the URL without end.
            if url.len() > MAX_URL {
                return Err(error_at(
                    server,
                    format!("the server URL grows past {MAX_URL} bytes with its variables"),
                ));
            }
        }
    }
    let path = match url.find("://") {
        Some(i) => url[i + 3..].find('/').map_or("", |p| &url[i + 3 + p..]).to_owned(),
        None => url,
    };
    let path = path.split(['?', '#']).next().unwrap_or("").trim_end_matches('/').to_owned();
    Ok((!path.is_empty()).then_some(path))
}

/// Reads a document's operations. JSON is read as the YAML it also is (tabs between tokens are
/// taken as spaces).
pub fn read(text: &str) -> Result<Document, DocumentError> {
    let whole = |message: String| DocumentError { line: 0, column: 0, message };
    if text.len() > MAX_DOCUMENT {
        return Err(whole(format!("larger than {} MiB", MAX_DOCUMENT >> 20)));
    }
    let json_like = text.trim_start().starts_with('{');
    let text = if json_like { std::borrow::Cow::Owned(text.replace('\t', " ")) } else { text.into() };
    // Aliases would be copied in whole where they are used (a few lines can stand for gigabytes),
    // and nesting is bounded: both are looked for before the document is built.
    let mut depth = 0usize;
    for event in Parser::new_from_str(&text) {
        let (event, span) = event.map_err(|e| DocumentError {
            line: e.marker().line() as u32,
            column: e.marker().col() as u32 + 1,
            message: e.info().to_owned(),
        })?;
        match event {
            Event::Alias(_) => {
                return Err(DocumentError {
                    line: span.start.line() as u32,
                    column: span.start.col() as u32 + 1,
                    message: "YAML aliases are not accepted in OpenAPI documents".to_owned(),
                });
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(DocumentError {
                        line: span.start.line() as u32,
                        column: span.start.col() as u32 + 1,
                        message: format!("nested deeper than {MAX_DEPTH} levels"),
                    });
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let docs = MarkedYaml::load_from_str(&text).map_err(|e| DocumentError {
        line: e.marker().line() as u32,
        column: e.marker().col() as u32 + 1,
        message: e.info().to_owned(),
    })?;
    let [root] = docs.as_slice() else {
        return Err(whole("expected one document".to_owned()));
    };
    if root.data.as_mapping().is_none() {
        return Err(error_at(root, "an OpenAPI document is a mapping (an object)"));
    }
    let base_path = match (get(root, "openapi"), get(root, "swagger")) {
        (Some(v), _) => {
            let version = match &v.data {
                YamlData::Value(saphyr::Scalar::String(s)) => s.to_string(),
                _ => return Err(error_at(v, "`openapi` must be a version string like \"3.1.0\"")),
            };
            if !(version.starts_with("3.0") || version.starts_with("3.1")) {
                return Err(error_at(v, format!("OpenAPI {version} is not supported (3.0 and 3.1 are)")));
            }
            match get(root, "servers").and_then(|s| s.data.as_sequence()).and_then(|s| s.first()) {
                Some(server) => server_path(server)?,
                None => None,
            }
        }
        (None, Some(v)) => {
            let version = v.data.as_str().map(str::to_owned).unwrap_or_default();
            if version != "2.0" {
                return Err(error_at(v, "`swagger` must be \"2.0\""));
            }
            match get(root, "basePath") {
                Some(b) => {
                    let b = string(b, "basePath")?.trim_end_matches('/');
                    (!b.is_empty()).then(|| b.to_owned())
                }
                None => None,
            }
        }
        (None, None) => {
            return Err(error_at(
                root,
                "not an OpenAPI document: it has no `openapi` (3.x) or `swagger` (2.0) field",
            ));
        }
    };
    if let Some(b) = &base_path
        && (!b.starts_with('/') || b.bytes().any(|c| c <= b' ' || c == 0x7f))
    {
        return Err(whole(format!("the API's path \"{b}\" is not a path prefix like \"/todo\"")));
    }
    let mut operations = Vec::new();
    let Some(paths) = get(root, "paths") else {
        return Ok(Document { base_path, operations });
    };
    let Some(paths) = paths.data.as_mapping() else {
        return Err(error_at(paths, "`paths` must be a mapping of path templates"));
    };
    let mut ids: Vec<(String, u32)> = Vec::new();
    for (path, item) in paths.iter() {
        let template = string(path, "a path")?;
        if !template.starts_with('/') {
            return Err(error_at(path, format!("\"{template}\" does not start with '/'")));
        }
        let Some(methods) = item.data.as_mapping() else {
            return Err(error_at(item, format!("the path item of \"{template}\" must be a mapping")));
        };
        for (method, op) in methods.iter() {
            let Some(name) = method.data.as_str() else { continue };
            if name == "$ref" {
                return Err(error_at(
                    method,
                    "path items by `$ref` are not supported: inline the operations",
                ));
            }
            if !METHODS.contains(&name) {
                // `parameters`, `summary`, `servers`, extensions …
                continue;
            }
            if op.data.as_mapping().is_none() {
                return Err(error_at(op, format!("{name} {template}: an operation must be a mapping")));
            }
            let id = match get(op, "operationId") {
                Some(v) => {
                    let id = string(v, "operationId")?.to_owned();
                    if let Some((_, line)) = ids.iter().find(|(i, _)| *i == id) {
                        return Err(error_at(
                            v,
                            format!("operationId \"{id}\" is used twice (first at line {line})"),
                        ));
                    }
                    ids.push((id.clone(), v.span.start.line() as u32));
                    Some(id)
                }
                None => None,
            };
            if operations.len() >= MAX_OPERATIONS {
                return Err(error_at(method, format!("more than {MAX_OPERATIONS} operations")));
            }
            operations.push(Imported {
                method: name.to_ascii_uppercase(),
                path: template.to_owned(),
                id,
                line: method.span.start.line() as u32,
                column: method.span.start.col() as u32 + 1,
            });
        }
    }
    Ok(Document { base_path, operations })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TODO_JSON: &str = r#"{
	"openapi": "3.0.1",
	"info": { "title": "Todo", "version": "1" },
	"servers": [ { "url": "https://{env}.example.com/todo/", "variables": { "env": { "default": "api" } } } ],
	"paths": {
		"/items": {
			"get": { "operationId": "listItems", "responses": { "200": { "description": "ok" } } },
			"post": { "operationId": "createItem", "responses": { "201": { "description": "made" } } }
		},
		"/items/{id}": {
			"parameters": [ { "name": "id", "in": "path", "required": true } ],
			"get": { "operationId": "getItem" },
			"delete": { }
		}
	}
}"#;

    #[test]
    fn a_json_document_with_tabs() {
        let d = read(TODO_JSON).expect("valid");
        assert_eq!(d.base_path.as_deref(), Some("/todo"));
        let ops: Vec<(&str, &str, Option<&str>, u32)> =
            d.operations.iter().map(|o| (&*o.method, &*o.path, o.id.as_deref(), o.line)).collect();
        assert_eq!(
            ops,
            [
                ("GET", "/items", Some("listItems"), 7),
                ("POST", "/items", Some("createItem"), 8),
                ("GET", "/items/{id}", Some("getItem"), 12),
                ("DELETE", "/items/{id}", None, 13),
            ]
        );
    }

    #[test]
    fn yaml_swagger_and_the_errors_are_located() {
        let yaml = "openapi: 3.1.0\nservers:\n  - url: /devices\npaths:\n  /{deviceId}/telemetry:\n    get:\n      operationId: getTelemetry\n";
        let d = read(yaml).expect("valid");
        assert_eq!(d.base_path.as_deref(), Some("/devices"));
        assert_eq!(d.operations[0].id.as_deref(), Some("getTelemetry"));
        assert_eq!(d.operations[0].line, 6);
        let swagger = "swagger: '2.0'\nbasePath: /v2/\npaths:\n  /pets:\n    get: {operationId: listPets}\n";
        assert_eq!(read(swagger).expect("valid").base_path.as_deref(), Some("/v2"));
        for (text, line, message) in [
            (
                "openapi: 3.1.0\npaths:\n  /a:\n    get: {operationId: x}\n  /b:\n    get: {operationId: x}\n",
                6,
                "used twice",
            ),
            ("openapi: 3.1.0\npaths:\n  a:\n    get: {}\n", 3, "does not start with '/'"),
            ("openapi: 2.5.0\n", 1, "not supported"),
            ("info: {title: x}\n", 1, "not an OpenAPI document"),
            ("openapi: 3.0.0\npaths:\n  /a: &x\n    get: {}\n  /b: *x\n", 5, "aliases"),
            ("openapi: 3.0.0\npaths:\n  /a:\n    get: [\n", 5, ""),
            ("openapi: 3.0.0\npaths:\n  /a:\n    $ref: '#/x'\n", 4, "$ref"),
        ] {
            let e = read(text).expect_err(text);
            assert_eq!(e.line, line, "{text}: {e:?}");
            assert!(e.message.contains(message), "{text}: {e:?}");
        }
        let grow = format!(
            "openapi: 3.0.0\nservers:\n  - url: /{{a}}\n    variables:\n      a: {{default: '{}'}}\n      b: {{default: '{}'}}\n",
            "{b}".repeat(100),
            "x".repeat(100)
        );
        assert!(read(&grow).expect_err("grows").message.contains("grows past"));
        let deep = format!("openapi: 3.0.0\nx: {}{}\n", "[".repeat(100), "]".repeat(100));
        assert!(read(&deep).expect_err("deep").message.contains("nested deeper"));
    }
}
