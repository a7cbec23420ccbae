//! What the policy benches share: a configuration's listener and backend, compiling one, and a
//! request's header fields as the server would hand them over.

use bytes::Bytes;
use portcullis_policy::{
    ApiPolicy, Facts, HeaderEdits, HeaderList, Inputs, PolicySet, RequestState, Verdict,
};

/// A listener (never started) and the backend `app`: what every bench configuration needs
/// before its own APIs.
pub(crate) const LISTENER: &str = r#"
[[listener]]
bind = "127.0.0.1:0"
certificate = { cert = "x.pem", key = "x.key" }
[[backend]]
name = "app"
url = "http://127.0.0.1:1"
"#;

/// Compiles a configuration's policies (files it names are given by absolute paths).
pub(crate) fn compile(text: &str, inputs: &Inputs) -> PolicySet {
    let config = portcullis_config::parse(std::path::Path::new("/bench.toml"), text).unwrap();
    portcullis_policy::compile(&config, inputs).unwrap()
}

/// One request through `policy`'s inbound steps, from a clean state: whether it may go on.
pub(crate) fn inbound(
    set: &PolicySet,
    policy: &ApiPolicy,
    facts: &Facts<'_>,
    fields: &Fields,
    state: &mut RequestState,
    edits: &mut HeaderEdits,
) -> bool {
    edits.reset(fields.count());
    state.clear();
    matches!(set.inbound(policy, facts, fields, state, edits), Verdict::Continue)
}

pub(crate) struct Fields(pub(crate) Vec<(Bytes, Bytes)>);

impl HeaderList for Fields {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn name(&self, i: usize) -> &[u8] {
        &self.0[i].0
    }
    fn value(&self, i: usize) -> &[u8] {
        &self.0[i].1
    }
}
