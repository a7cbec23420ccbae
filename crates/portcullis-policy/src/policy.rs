//! Compiled policies and their evaluation.

use bytes::Bytes;
use portcullis_config::{Config, ConfigErrors, SetHeaderAction, Step as StepConfig, StepKind};

use crate::facts::{Facts, HeaderEdits, HeaderList};
use crate::template::Template;

/// What a request may do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Continue,
}

#[derive(Debug)]
struct SetHeader {
    /// As configured (its case is what the backend or client sees).
    name: Bytes,
    action: SetHeaderAction,
    value: Option<Template>,
}

#[derive(Debug)]
enum Step {
    SetHeader(SetHeader),
}

/// The steps one API runs: the global scope's (unless it opted out), then its own.
#[derive(Debug, Default)]
pub struct ApiPolicy {
    inbound: Vec<Step>,
    outbound: Vec<Step>,
}

/// Every API's policy, plus what applies to all requests.
#[derive(Debug, Default)]
pub struct PolicySet {
    /// Indexed like `Config::apis`.
    pub apis: Vec<ApiPolicy>,
    /// Lower-case names of the headers the proxy derives from a certificate: removed from every
    /// incoming request before anything else looks at it.
    pub identity_headers: Vec<Bytes>,
}

fn compile_steps(
    steps: &[StepConfig],
    errors: &mut ConfigErrors,
    identity: &mut Vec<Bytes>,
    inbound: bool,
) -> Vec<Step> {
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
        match &step.kind {
            StepKind::SetHeader(s) => {
                let value = match &s.value {
                    Some(v) => match Template::parse(&v.value, &v.loc) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            errors.push(e);
                            continue;
                        }
                    },
                    None => None,
                };
                if inbound && value.as_ref().is_some_and(Template::uses_client_cert) {
                    let lower = Bytes::from(s.name.value.to_ascii_lowercase().into_bytes());
                    if !identity.contains(&lower) {
                        identity.push(lower);
                    }
                }
                out.push(Step::SetHeader(SetHeader {
                    name: Bytes::from(s.name.value.clone().into_bytes()),
                    action: s.action,
                    value,
                }));
            }
        }
    }
    out
}

/// Compiles the policy of every API in `config`; reports every error.
pub fn compile(config: &Config) -> Result<PolicySet, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let mut identity = Vec::new();
    let mut apis = Vec::with_capacity(config.apis.len());
    for api in &config.apis {
        let mut inbound_cfg: Vec<StepConfig> = Vec::new();
        let mut outbound_cfg: Vec<StepConfig> = Vec::new();
        if api.inherit {
            inbound_cfg.extend(config.inbound.iter().cloned());
            outbound_cfg.extend(config.outbound.iter().cloned());
        }
        inbound_cfg.extend(api.inbound.iter().cloned());
        outbound_cfg.extend(api.outbound.iter().cloned());
        let inbound = compile_steps(&inbound_cfg, &mut errors, &mut identity, true);
        let outbound = compile_steps(&outbound_cfg, &mut errors, &mut identity, false);
        apis.push(ApiPolicy { inbound, outbound });
    }
    // Global steps of APIs that opted out still name identity headers: strip those everywhere.
    let _ = compile_steps(&config.inbound, &mut ConfigErrors::default(), &mut identity, true);
    errors.into_result(PolicySet { apis, identity_headers: identity })
}

fn run_set_header(s: &SetHeader, facts: &Facts<'_>, headers: &dyn HeaderList, edits: &mut HeaderEdits) {
    match s.action {
        SetHeaderAction::Delete => edits.remove_named(headers, &s.name),
        SetHeaderAction::Skip if edits.is_present(headers, &s.name) => {}
        action => {
            let Some(template) = &s.value else { return };
            if action == SetHeaderAction::Override {
                edits.remove_named(headers, &s.name);
            }
            edits.add_with(&s.name, |out| template.render(facts, headers, out));
        }
    }
}

impl ApiPolicy {
    /// Runs the inbound steps; header changes for the upstream request go to `edits`.
    pub fn inbound(&self, facts: &Facts<'_>, headers: &dyn HeaderList, edits: &mut HeaderEdits) -> Verdict {
        for step in &self.inbound {
            match step {
                Step::SetHeader(s) => run_set_header(s, facts, headers, edits),
            }
        }
        Verdict::Continue
    }

    /// Runs the outbound steps on a backend's response headers.
    pub fn outbound(&self, facts: &Facts<'_>, headers: &dyn HeaderList, edits: &mut HeaderEdits) {
        for step in &self.outbound {
            match step {
                Step::SetHeader(s) => run_set_header(s, facts, headers, edits),
            }
        }
    }

    /// Whether the outbound side has anything to do (the server skips the walk otherwise).
    pub fn has_outbound(&self) -> bool {
        !self.outbound.is_empty()
    }
}
