//! One exchange: a request routed, run through policy, forwarded to its backend, and the
//! backend's response relayed back (or the proxy's own answer when a step or the backend says
//! no).

use std::pin::pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::time::Instant;
use portcullis_config::ClientCertMode;
use portcullis_http::forward::{self, BodyMode};
use portcullis_http::{Framing, Reaction, Replacer, Side, Version, remove_query_parameter, write};
use portcullis_jose::RemoteKeys;
use portcullis_policy::{Answer, ApiPolicy, Facts, Need, RouteMatch, Verdict};
use portcullis_tls::Stream;

use super::{Conn, EARLY_ANSWER_WAIT, RequestFields, ResponseFields, WRITE_TIMEOUT, is_identity};
use crate::relay::{RelayError, read_length, relay_body, relay_rewritten};
use crate::snapshot::{Backend, Route, Server, Snapshot, forwarded_path, strip_port};
use crate::upstream::{Fetched, HeadProgress, Upstream, UpstreamError};

use super::Upstreamed;

impl<S: Stream> Conn<S> {
    /// One request/response exchange. Returns whether to read another request.
    pub(super) async fn exchange(&mut self) -> bool {
        let snap = self.worker.snapshot();
        self.body_bytes = 0;
        self.bytes_in = 0;
        self.upstream = Upstreamed::default();
        let mut id = [0u8; 16];
        self.worker.next_request_id(&mut id);
        self.current.set(Some(id));
        #[cfg(feature = "fault-injection")]
        match self.head.header(b"x-portcullis-fault").filter(|_| self.worker.faults) {
            Some(b"panic") => panic!("fault injection: this connection panics"),
            Some(b"kill-worker") => self.worker.doomed.set(true),
            // The worker's loop stops turning for a while (a blocking call gone wrong).
            Some(b"stall") => std::thread::sleep(Duration::from_secs(3)),
            _ => {}
        }
        // For the duration histogram, and the access log.
        let started = (Instant::now(), snap.server.access_log.is_some());
        let now_ms = portcullis_tls::now_unix_ms();
        let now = (now_ms / 1000) as i64;
        let routed = snap.router.find(self.head.host(), self.head.path_only()).and_then(|route| {
            let rest = route.rest_of(self.head.path_only());
            Some((route, snap.policies.apis[route.api].select(self.head.method(), rest)?))
        });
        if let (Some(max), Framing::Length(n)) = (snap.server.max_body_size, self.head.framing())
            && n > max
        {
            tracing::info!(peer = %self.peer, length = n, max_body_size = max, "request body too large");
            self.access_log(&snap, None, 413, started, &id, "body larger than max_body_size");
            return self.respond_local(413, "Request body too large", false).await;
        }
        // What `require` established at the handshake holds on every request, as a policy step
        // would check it: a CRL loaded since (on an open keep-alive connection, or for a session
        // resumed from a ticket) or an expiry that passed ends the connection.
        if self.info.client_mode == ClientCertMode::Require
            && let Some(cert) = &self.info.client_cert
        {
            let why = if snap.policies.revokes(cert) {
                Some("client certificate revoked")
            } else if now > cert.not_after {
                Some("client certificate expired")
            } else {
                None
            };
            if let Some(reason) = why {
                self.worker.stats.refused(reason);
                tracing::info!(peer = %self.peer, reason, client_cert = %cert.thumbprint, "request refused: certificate no longer valid");
                self.access_log(&snap, None, 403, started, &id, reason);
                self.connection_refused = true;
                return self.respond_local(403, "Invalid client certificate", false).await;
            }
        }
        // The Host must belong to the TLS site the client connected to (RFC 9110 §15.5.20).
        if self.acceptor.has_sites()
            && let Some(host) = self.head.host()
            && self.acceptor.site_for_host(strip_port(host)) != self.info.site
        {
            tracing::info!(peer = %self.peer, host = %String::from_utf8_lossy(host), sni = ?self.info.server_name, "request for a host of another TLS site");
            self.access_log(&snap, None, 421, started, &id, "host of another TLS site");
            return self.respond_local(421, "Misdirected request", false).await;
        }
        let Some((route, policy)) = routed else {
            self.access_log(&snap, None, 404, started, &id, "no API or operation");
            return self.respond_local(404, "Resource not found", false).await;
        };
        // What `{route.NAME}` reads, kept apart from the head (which forwarding rewrites); only
        // for operations with parameters.
        let route_path = if policy.route_params().is_empty() {
            Vec::new()
        } else {
            route.rest_of(self.head.path_only()).to_vec()
        };
        let request_id = std::str::from_utf8(&id).unwrap_or("");
        let cert = self.info.client_cert.clone();
        let peer_ip = self.peer_ip.clone();
        let target = self.head.path();
        let mut facts = Facts {
            client_cert: cert.as_deref(),
            client_addr: self.peer,
            client_ip: &peer_ip,
            request_id,
            now,
            now_ms,
            query: target.iter().position(|&b| b == b'?').map_or(&b""[..], |q| &target[q + 1..]),
            route: RouteMatch { path: &route_path, params: policy.route_params() },
            method: self.head.method(),
            path: self.head.path_only(),
        };
        let identity = &snap.policies.identity_headers;
        self.edits.reset(self.head.field_count());
        self.state.clear();
        if snap.log_steps {
            // Loggers whose buffer is full: their steps count a message dropped, not make one.
            let full = snap.loggers.iter().take(64).enumerate().filter(|(_, p)| p.is_full());
            self.state.set_loggers_full(full.fold(0, |mask, (i, _)| mask | 1 << i));
        }
        let fields = RequestFields { head: &self.head, identity };
        let mut from = 0;
        let verdict = loop {
            match snap.policies.inbound_from(policy, from, &facts, &fields, &mut self.state, &mut self.edits)
            {
                // What a waiting step needs is got here, without blocking the worker, and the
                // evaluation resumed at that step.
                Verdict::Wait { step, need } => {
                    match need {
                        Need::Keys(providers) => {
                            refetched(providers).await;
                            self.state.put(step, Answer::KeysRefreshed);
                        }
                        Need::Sync => {
                            crate::fleet::synced(&self.worker).await;
                            self.state.put(step, Answer::Synced);
                        }
                        Need::Callout { target, max_response } => {
                            let request = self.state.callout_request();
                            let c = snap.callouts.get(target);
                            let answer =
                                callout(&self.worker, c, request, max_response, &mut self.io_timer).await;
                            self.state.put(step, answer);
                        }
                    }
                    from = step;
                    // The steps after a wait judge the time they run at, not the request's
                    // arrival: a rate limit or a quota after a slow callout counts in the window
                    // it is in, and a token that expired meanwhile is refused.
                    facts.now_ms = portcullis_tls::now_unix_ms();
                    facts.now = (facts.now_ms / 1000) as i64;
                }
                v => break v,
            }
        };
        let (now, now_ms) = (facts.now, facts.now_ms);
        let hits = self.state.take_callout_hits();
        if hits > 0 {
            crate::stats::bump(&self.worker.stats.callout_cache_hits, u64::from(hits));
        }
        // A limited key this worker had not seen: its sync task shares it soon.
        if self.worker.local.borrow().deltas.has_new_key() {
            self.worker.fleet_nudge.wake();
        }
        if let Verdict::Respond { response, reason } = verdict {
            if response.status >= 400 {
                self.worker.stats.refused(reason);
                tracing::info!(
                    peer = %self.peer,
                    api = %route.name,
                    operation = policy.operation(),
                    status = response.status,
                    reason,
                    client_cert = facts.client_cert.map_or("-", |c| c.thumbprint.as_str()),
                    "request refused by policy"
                );
            }
            snap.policies.complete(&mut self.state, response.status, 0);
            self.access_log(&snap, Some((route, policy)), response.status, started, &id, reason);
            return self.respond_policy(response).await;
        }
        // The response body is rewritten on its way back: asked for without compression.
        if snap.policies.rewrites_body(policy) {
            self.edits.replace(&fields, &Bytes::from_static(b"Accept-Encoding"), b"identity");
            // A part of a body cannot be rewritten as the whole would be: the whole is asked for.
            self.edits.remove(&fields, b"range");
            self.edits.remove(&fields, b"if-range");
        }
        let backend = &snap.backends[route.backend];
        self.refusal = "-";
        self.body_bytes = 0;
        // Outbound steps do not read the query (and the head is read again while forwarding):
        // built anew, since `facts` borrows the head for its query. Messages for loggers may
        // name the method and path: copied, when a step writes messages (into the connection's
        // buffer for them, taken out while the facts borrow it).
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let split = if snap.log_steps {
            let (method, path) = (self.head.method(), self.head.path_only());
            line.extend_from_slice(method);
            line.extend_from_slice(path);
            method.len()
        } else {
            0
        };
        let facts = Facts {
            client_cert: cert.as_deref(),
            client_addr: self.peer,
            client_ip: &peer_ip,
            request_id,
            now,
            now_ms,
            query: b"",
            route: RouteMatch { path: &route_path, params: policy.route_params() },
            method: &line[..split],
            path: &line[split..],
        };
        let (keep, status) = self.forward(&snap, route, policy, backend, &facts).await;
        self.line = line;
        snap.policies.complete(&mut self.state, status, self.body_bytes);
        self.access_log(&snap, Some((route, policy)), status, started, &id, self.refusal);
        keep
    }

    /// Writes the request head for the backend into `out`.
    /// `body`: the framing of a rewritten request body (its new length, or chunked), in place of
    /// the client's.
    fn write_upstream_head(
        &mut self,
        snap: &Snapshot,
        route: &Route,
        policy: &ApiPolicy,
        backend: &Backend,
        (authority, body): (&Bytes, Option<BodyMode>),
    ) {
        let identity = &snap.policies.identity_headers;
        let underscores = snap.server.allow_underscores_in_headers;
        let out = &mut self.out;
        out.clear();
        forwarded_path(route, backend, self.head.path(), &mut self.path);
        if let Some(name) = snap.policies.stripped_query_parameter(policy, &self.state) {
            remove_query_parameter(&mut self.path, name);
        }
        write::request_line(out, self.head.method(), &self.path);
        let absolute = self.head.is_absolute_form();
        let mut host_written = false;
        for i in 0..self.head.field_count() {
            let (name, value, hop) = self.head.field(i);
            if hop
                || self.edits.is_removed(i)
                || is_identity(identity, name)
                || (!underscores && name.contains(&b'_'))
                || forward::is_forwarding_field(name)
                || name.eq_ignore_ascii_case(b"content-length")
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"host") {
                if absolute {
                    continue;
                }
                host_written = true;
            }
            write::header(out, name, value);
        }
        if !host_written {
            write::header(out, b"Host", self.head.host().unwrap_or(authority));
        }
        for (name, value) in self.edits.added() {
            write::header(out, name, value);
        }
        forward::write_forwarding_fields(out, self.peer_ip.as_bytes());
        match body {
            None => forward::write_request_framing(out, &self.head),
            Some(BodyMode::Length(n)) => write::content_length(out, n),
            Some(_) => write::header(out, b"Transfer-Encoding", b"chunked"),
        }
        write::end_head(out);
    }

    /// Forwards the request and relays the response. Returns (keep client open, status sent).
    async fn forward(
        &mut self,
        snap: &Snapshot,
        route: &Route,
        policy: &ApiPolicy,
        backend: &Backend,
        facts: &Facts<'_>,
    ) -> (bool, u16) {
        // A request that may be sent again (RFC 9110 §9.2.2) and has no body to lose is repeated
        // once if the pooled connection it went out on turns out dead after all (a close or a
        // 408 that arrived just after the check in `checkout`).
        let repeatable = self.head.framing() == Framing::None
            && forward::is_idempotent(self.head.method())
            && !self.head.expect_continue();
        let mut attempt = 0;
        let mut answered_early = false;
        self.interim_sent = false;
        // The operation's (or API's) timeout, else the backend's.
        let response_timeout = policy.timeout().unwrap_or(backend.response_timeout);
        let now_ms = portcullis_tls::now_unix_ms();
        let worker = self.worker.clone();
        let busy = |i: usize| worker.pool.borrow().in_flight(&backend.servers[i].target.key);
        let mut server = worker.picker.pick(backend, None, now_ms, busy);
        // Counted until the response has been relayed.
        let mut _flight = None;
        // Inbound find_and_replace on the request body (not on a compressed one).
        let mut request_rewrite = {
            let pairs = snap.policies.request_rewrites(policy, &self.state);
            let coded =
                self.head.header(b"content-encoding").is_some_and(|c| !c.eq_ignore_ascii_case(b"identity"));
            if coded
                && !pairs.is_empty()
                && !COMPRESSED_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(api = %route.name, "a request body to rewrite came compressed: sent as it is (logged once)");
            }
            (!pairs.is_empty() && !coded).then(|| Replacer::new(&pairs))
        };
        // A request that may be sent again goes to another server once, when the first could
        // not be reached or dropped it before answering.
        let mut switched = false;
        let (upstream, server) = loop {
            attempt += 1;
            let chosen = &backend.servers[server];
            _flight = Some(InFlight::new(&worker.pool, &chosen.target.key));
            let failed = |e: &UpstreamError, switched: bool| {
                let other = repeatable
                    && !switched
                    && backend.servers.len() > 1
                    && matches!(
                        e,
                        UpstreamError::Connect(_)
                            | UpstreamError::ConnectTimeout
                            | UpstreamError::Handshake(_)
                            | UpstreamError::Lost(_)
                    );
                let at = portcullis_tls::now_unix_ms();
                if let Some(out) = chosen.health.failed(backend.eject_after, backend.eject_for, at) {
                    tracing::warn!(backend = %backend.name, server = %chosen.name, error = %e, out = ?out, "server out of rotation after consecutive failures");
                }
                other
            };
            let sent_at = Instant::now();
            let mut up = match Upstream::checkout(&self.worker.pool, &chosen.target).await {
                Ok(c) => c,
                Err(e) => {
                    if failed(&e, switched) && !self.interim_sent {
                        tracing::info!(backend = %backend.name, server = %chosen.name, error = %e, "trying another server");
                        switched = true;
                        attempt = 0;
                        server = worker.picker.pick(backend, Some(server), now_ms, |_| 0);
                        continue;
                    }
                    return self.upstream_failed(backend, chosen, e, false).await;
                }
            };
            let reused = up.reused;
            let body = forward::request_body(&self.head);
            let rewrite = match &mut request_rewrite {
                Some(r) if !matches!(body, BodyMode::None) => Some(r),
                _ => None,
            };
            // A body rewritten whole is read before the head goes out (its length is new).
            let held = matches!(body, BodyMode::Length(n) if n <= HOLD_TO_REWRITE) && rewrite.is_some();
            if !held {
                let framing = rewrite.is_some().then_some(BodyMode::UntilClose { chunk: true });
                self.write_upstream_head(
                    snap,
                    route,
                    policy,
                    backend,
                    (&chosen.target.key.authority, framing),
                );
            }
            if self.head.expect_continue() {
                let mut cont = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]);
                let written =
                    self.io_timer.within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut cont))).await;
                if !matches!(written, Ok(Ok(()))) {
                    return (false, 0);
                }
            }
            let timeouts = (snap.server.body_timeout, response_timeout, snap.server.max_body_size);
            let sent = match rewrite {
                None => {
                    relay_body(
                        body,
                        (&mut self.client, &mut self.rbuf),
                        &mut up.stream,
                        &mut self.out,
                        timeouts,
                        &mut self.io_timer,
                        true,
                    )
                    .await
                }
                Some(replacer) => {
                    self.send_rewritten_request(
                        (snap, route, policy, backend, &chosen.target.key.authority),
                        body,
                        held,
                        replacer,
                        &mut up,
                        timeouts,
                    )
                    .await
                }
            };
            // Only a body read whole leaves the client connection in step with its requests.
            let body_whole = sent.is_ok();
            let result = match sent {
                Ok(n) => {
                    self.body_bytes = n;
                    self.bytes_in = n;
                    self.read_response_head(&mut up, response_timeout).await
                }
                // The backend stopped taking the body: it may have answered already (a 413, a
                // 401 before the upload), and that answer is the client's.
                Err(RelayError::Destination(e)) => {
                    let wait = EARLY_ANSWER_WAIT.min(response_timeout);
                    match self.read_response_head(&mut up, wait).await {
                        Ok(()) => {
                            tracing::debug!(backend = %backend.name, status = self.resp.status(), error = %e, "backend answered before taking the whole body");
                            answered_early = true;
                            Ok(())
                        }
                        Err(_) => Err(UpstreamError::Lost(e)),
                    }
                }
                Err(e) => Err(UpstreamError::RequestBody(e)),
            };
            let retry = reused && attempt == 1 && repeatable && !self.interim_sent;
            match result {
                // What a pooled connection says when the backend timed it out while it was idle
                // (an unsolicited 408, then close) is not the answer to this request.
                Ok(()) if retry && self.resp.status() == 408 => {
                    tracing::debug!(backend = %backend.name, "pooled connection answered 408; retrying");
                    continue;
                }
                Ok(()) => {
                    let took = sent_at.elapsed();
                    self.worker.stats.upstream_duration.observe(took);
                    self.upstream = Upstreamed {
                        status: self.resp.status(),
                        micros: took.as_micros() as u64,
                        server: Some(server),
                    };
                    if matches!(self.resp.status(), 502..=504) {
                        let e =
                            UpstreamError::BadResponse(portcullis_http::HeadError::Malformed("a 5xx answer"));
                        failed(&e, true);
                    } else {
                        chosen.health.succeeded();
                    }
                    break (up, server);
                }
                // Closed, reset, or bytes that are no response: a pooled connection the backend
                // had given up on.
                Err(e @ (UpstreamError::Lost(_) | UpstreamError::BadResponse(_))) if retry => {
                    tracing::debug!(backend = %backend.name, error = %e, "pooled connection was stale; retrying");
                    continue;
                }
                Err(e) => {
                    if e.side() == Side::Backend && failed(&e, switched) && !self.interim_sent {
                        tracing::info!(backend = %backend.name, server = %chosen.name, error = %e, "trying another server");
                        switched = true;
                        attempt = 0;
                        server = worker.picker.pick(backend, Some(server), now_ms, |_| 0);
                        continue;
                    }
                    return self.upstream_failed(backend, chosen, e, body_whole).await;
                }
            }
        };
        let mut upstream = upstream;
        let chosen = &backend.servers[server];
        drop(request_rewrite);

        let status = self.resp.status();
        let client_http10 = self.head.version() == Version::Http10;
        // After an early answer, the rest of the client's body is unread: the client connection
        // ends after the response (lingering), and the backend's is not reused.
        self.unread_input |= answered_early;
        let mut keep = self.client_keeps_alive() && !answered_early;
        let (mode, mode_keeps) = forward::response_body(&self.resp, self.head.is_head(), client_http10);
        keep &= mode_keeps;
        self.edits.reset(self.resp.field_count());
        let mut rewrite = None;
        if snap.policies.has_outbound(policy, &self.state) {
            self.state.set_response_status(status);
            snap.policies.outbound(policy, facts, &ResponseFields(&self.resp), &self.state, &mut self.edits);
            let (pairs, redirect) = snap.policies.response_rewrites(policy, &self.state);
            if redirect {
                self.redirect_content_urls(route, backend);
            }
            if !pairs.is_empty() && !matches!(mode, BodyMode::None) && self.resp.status() != 206 {
                match self.resp.header(b"content-encoding").filter(|c| !c.eq_ignore_ascii_case(b"identity")) {
                    None => rewrite = Some(Replacer::new(&pairs)),
                    Some(coding) => {
                        if !COMPRESSED_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!(backend = %backend.name, coding = %String::from_utf8_lossy(coding), "a response to rewrite came compressed although identity was asked for: sent as it is (logged once)");
                        }
                    }
                }
            }
        }
        let relayed = match rewrite {
            None => {
                self.write_response_head(mode, keep, client_http10);
                relay_body(
                    mode,
                    (&mut upstream.stream, &mut self.ubuf),
                    &mut self.client,
                    &mut self.out,
                    (response_timeout, WRITE_TIMEOUT, None),
                    &mut self.io_timer,
                    false,
                )
                .await
            }
            Some(mut replacer) => {
                match mode {
                    // Small enough to hold: rewritten whole, sent with its new length.
                    BodyMode::Length(n) if n <= HOLD_TO_REWRITE => {
                        let src = (&mut upstream.stream, &mut self.ubuf);
                        match read_length(src, n, response_timeout, &mut self.io_timer).await {
                            Ok(body) => {
                                let mut rewritten = BytesMut::with_capacity(body.len());
                                replacer.feed(&body, &mut rewritten);
                                replacer.finish(&mut rewritten);
                                self.write_response_head(
                                    BodyMode::Length(rewritten.len() as u64),
                                    keep,
                                    client_http10,
                                );
                                self.out.extend_from_slice(&rewritten);
                                let sent = self
                                    .io_timer
                                    .within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut self.out)))
                                    .await;
                                match sent {
                                    Ok(Ok(())) => Ok(rewritten.len() as u64),
                                    Ok(Err(e)) => Err(RelayError::Destination(e)),
                                    Err(_) => {
                                        Err(RelayError::Destination(std::io::ErrorKind::TimedOut.into()))
                                    }
                                }
                            }
                            // Nothing has gone to the client yet: it gets the proxy's answer.
                            Err(e) => {
                                let e = match e {
                                    RelayError::SourceTimeout => UpstreamError::Timeout,
                                    _ => UpstreamError::BadResponse(portcullis_http::HeadError::Malformed(
                                        "the body ended before its length",
                                    )),
                                };
                                return self.upstream_failed(backend, chosen, e, true).await;
                            }
                        }
                    }
                    // Streamed: chunked for HTTP/1.1 clients, until the close for HTTP/1.0 ones.
                    _ => {
                        keep &= !client_http10;
                        self.write_response_head(
                            BodyMode::UntilClose { chunk: !client_http10 },
                            keep,
                            client_http10,
                        );
                        relay_rewritten(
                            mode,
                            (&mut upstream.stream, &mut self.ubuf),
                            &mut self.client,
                            &mut self.out,
                            &mut replacer,
                            (response_timeout, WRITE_TIMEOUT, None),
                            &mut self.io_timer,
                            !client_http10,
                        )
                        .await
                    }
                }
            }
        };
        match relayed {
            Ok(n) => {
                self.body_bytes += n;
                // Not after HEAD: a backend that wrongly sends a body would poison the next
                // response on the connection.
                let reusable = self.resp.keep_alive()
                    && !answered_early
                    && !matches!(mode, BodyMode::UntilClose { .. })
                    && self.ubuf.is_empty()
                    && !self.head.is_head();
                upstream.finish(&self.worker.pool, &chosen.target, reusable);
                self.ubuf.clear();
                (keep, status)
            }
            Err(RelayError::Destination(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "client went away during the response");
                self.ubuf.clear();
                (false, status)
            }
            Err(e) => {
                tracing::warn!(backend = %backend.name, error = %e, "backend response body failed; response truncated");
                self.ubuf.clear();
                (false, status)
            }
        }
    }

    /// Sends a request body through inbound `find_and_replace`: read whole and sent with its new
    /// length when `held` (the head goes with it), else streamed chunked after the head already
    /// written. Returns the bytes sent.
    async fn send_rewritten_request(
        &mut self,
        (snap, route, policy, backend, authority): (&Snapshot, &Route, &ApiPolicy, &Backend, &Bytes),
        body: BodyMode,
        held: bool,
        replacer: &mut Replacer,
        up: &mut Upstream,
        (read_timeout, _, max): (Duration, Duration, Option<u64>),
    ) -> Result<u64, RelayError> {
        if let (true, BodyMode::Length(n)) = (held, body) {
            let whole =
                read_length((&mut self.client, &mut self.rbuf), n, read_timeout, &mut self.io_timer).await?;
            let mut rewritten = BytesMut::with_capacity(whole.len());
            replacer.feed(&whole, &mut rewritten);
            replacer.finish(&mut rewritten);
            let framing = Some(BodyMode::Length(rewritten.len() as u64));
            self.write_upstream_head(snap, route, policy, backend, (authority, framing));
            self.out.extend_from_slice(&rewritten);
            let written =
                self.io_timer.within(WRITE_TIMEOUT, pin!(up.stream.write_all_buf(&mut self.out))).await;
            return match written {
                Ok(Ok(())) => Ok(rewritten.len() as u64),
                Ok(Err(e)) => Err(RelayError::Destination(e)),
                Err(_) => Err(RelayError::Destination(std::io::ErrorKind::TimedOut.into())),
            };
        }
        relay_rewritten(
            body,
            (&mut self.client, &mut self.rbuf),
            &mut up.stream,
            &mut self.out,
            replacer,
            (read_timeout, WRITE_TIMEOUT, max),
            &mut self.io_timer,
            true,
        )
        .await
    }

    /// `redirect_content_urls`: a `Location` or `Content-Location` that points into the
    /// backend's URL is rewritten to the same place under the API's public URL (the request's
    /// `Host`, over HTTPS, under the API's path).
    fn redirect_content_urls(&mut self, route: &Route, backend: &Backend) {
        let Some(host) = self.head.host() else { return };
        let scheme: &[u8] = if backend.https { b"https://" } else { b"http://" };
        let default_port: &[u8] = if backend.https { b":443" } else { b":80" };
        // Any server's URL is the backend's.
        let authorities: Vec<&[u8]> = backend
            .servers
            .iter()
            .flat_map(|s| {
                let a = &s.target.key.authority[..];
                [Some(a), a.strip_suffix(default_port)]
            })
            .flatten()
            .collect();
        let public_prefix = if route.prefix.as_ref() == b"/" { &b""[..] } else { &route.prefix[..] };
        for name in [&b"location"[..], b"content-location"] {
            let Some(value) = self.resp.header(name) else { continue };
            let Some(rest) = value
                .get(..scheme.len())
                .filter(|s| s.eq_ignore_ascii_case(scheme))
                .map(|_| &value[scheme.len()..])
            else {
                continue;
            };
            let after_host = authorities.iter().find_map(|a| {
                let tail = rest.get(a.len()..)?;
                (rest[..a.len()].eq_ignore_ascii_case(a)
                    && matches!(tail.first(), None | Some(b'/' | b'?' | b'#')))
                .then_some(tail)
            });
            let Some(path) = after_host else { continue };
            let base = &backend.base_path[..];
            let Some(path) = path
                .strip_prefix(base)
                .filter(|p| base.is_empty() || matches!(p.first(), None | Some(b'/' | b'?' | b'#')))
            else {
                continue;
            };
            let mut public = Vec::with_capacity(8 + host.len() + public_prefix.len() + path.len());
            public.extend_from_slice(b"https://");
            public.extend_from_slice(host);
            public.extend_from_slice(public_prefix);
            public.extend_from_slice(path);
            let field = if name == b"location" { "Location" } else { "Content-Location" };
            self.edits.replace(&ResponseFields(&self.resp), &Bytes::from_static(field.as_bytes()), &public);
        }
    }

    fn write_response_head(&mut self, mode: BodyMode, keep: bool, client_http10: bool) {
        let out = &mut self.out;
        out.clear();
        write::status_line(out, Version::Http11, self.resp.status(), self.resp.reason());
        // A recipient with a clock adds the Date an origin left out (RFC 9110 §6.6.1).
        if self.resp.header(b"date").is_none() {
            write::date(out);
        }
        for i in 0..self.resp.field_count() {
            let (name, value, hop) = self.resp.field(i);
            if hop || self.edits.is_removed(i) || name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            write::header(out, name, value);
        }
        for (name, value) in self.edits.added() {
            write::header(out, name, value);
        }
        // Framing from the parsed head, as for requests.
        forward::write_response_framing(out, mode, &self.resp, self.head.is_head());
        write::Connection::for_client(keep, client_http10).write(out);
        write::end_head(out);
    }

    /// Sends the interim response in `self.resp` on to the client (hop-by-hop fields dropped).
    /// A failure shows again, and is handled, when the final response is written.
    async fn forward_interim(&mut self) {
        let out = &mut self.out;
        out.clear();
        write::status_line(out, Version::Http11, self.resp.status(), self.resp.reason());
        for i in 0..self.resp.field_count() {
            let (name, value, hop) = self.resp.field(i);
            if !hop {
                write::header(out, name, value);
            }
        }
        write::end_head(out);
        let _ = self.io_timer.within(WRITE_TIMEOUT, pin!(self.client.write_all_buf(&mut self.out))).await;
    }

    /// Reads the backend's final response head into `self.resp`, interim ones forwarded or
    /// skipped, all of them within `response_timeout`.
    async fn read_response_head(
        &mut self,
        up: &mut Upstream,
        response_timeout: Duration,
    ) -> Result<(), UpstreamError> {
        let deadline = Instant::now() + response_timeout;
        let mut progress = HeadProgress::default();
        self.ubuf.clear();
        loop {
            // Interim responses are bounded by count there, as well as by the deadline.
            up.read_head(&mut self.ubuf, &mut self.resp, &mut progress, &mut self.io_timer, deadline).await?;
            if !self.resp.is_informational() {
                return Ok(());
            }
            // Forwarded to an HTTP/1.1 client (RFC 9110 §15.2: 103 Early Hints, 102), but for
            // 100 Continue, which the proxy answers itself.
            if self.resp.status() != 100 && self.head.version() == Version::Http11 {
                self.interim_sent = true;
                self.forward_interim().await;
            }
        }
    }

    /// Answers for a backend that failed; details go to the log only.
    async fn upstream_failed(
        &mut self,
        backend: &Backend,
        server: &Server,
        e: UpstreamError,
        body_consumed: bool,
    ) -> (bool, u16) {
        self.refusal = e.refusal();
        let Reaction::Respond(status, message) = e.reaction() else {
            tracing::debug!(peer = %self.peer, error = %e, "client went away while sending the body");
            return (false, 0);
        };
        if status == 502 || status == 504 {
            crate::stats::WorkerStats::add(&self.worker.stats.upstream_errors[usize::from(status == 504)]);
        }
        match e.side() {
            Side::Client => tracing::info!(peer = %self.peer, error = %e, status, "request body refused"),
            Side::Backend | Side::Internal => {
                tracing::warn!(backend = %backend.name, server = %server.name, addr = %server.target.key.addr, error = %e, status, "backend failed")
            }
        }
        (self.respond_local(status, message, body_consumed).await, status)
    }
}

/// Counts a request in flight on a server of the worker's, for as long as it lives.
struct InFlight<'a> {
    pool: &'a std::cell::RefCell<crate::pool::Pool>,
    key: &'a crate::upstream::PoolKey,
}

impl<'a> InFlight<'a> {
    fn new(
        pool: &'a std::cell::RefCell<crate::pool::Pool>,
        key: &'a crate::upstream::PoolKey,
    ) -> InFlight<'a> {
        pool.borrow_mut().count_in_flight(key, true);
        InFlight { pool, key }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.pool.borrow_mut().count_in_flight(self.key, false);
    }
}

/// Response bodies up to this long are rewritten whole and sent with their new length; longer
/// ones (and those without a length) stream out chunked.
const HOLD_TO_REWRITE: u64 = 256 * 1024;

/// Set once a compressed response to rewrite has been logged.
static COMPRESSED_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sends a callout's request to its service and reads the answer, all within the callout's
/// timeout, on the worker's pooled connections. Failures are logged here; the step hears only
/// that there was no answer.
async fn callout(
    worker: &crate::worker::Worker,
    callout: Option<&crate::snapshot::Callout>,
    request: Option<bytes::Bytes>,
    max_response: usize,
    timer: &mut crate::timer::Timer,
) -> Answer {
    let (Some(c), Some(request)) = (callout, request) else {
        return Answer::Failed("callout not configured");
    };
    let mut into = Fetched::default();
    // Sent again on a fresh connection (a pooled one the service had closed) only when the
    // method is safe to repeat.
    let method = request.split(|&b| b == b' ').next().unwrap_or_default();
    let repeatable = forward::is_idempotent(method);
    let fetch = Upstream::fetch(
        &worker.pool,
        &c.target,
        (&request, repeatable),
        &mut into,
        max_response,
        timer,
        c.timeout,
    );
    let started = std::time::Instant::now();
    let error = match monoio::time::timeout(c.timeout, fetch).await {
        Ok(Ok(())) => {
            worker.stats.callout_duration.observe(started.elapsed());
            tracing::debug!(callout = %c.name, status = into.head.status(), "callout answered");
            return Answer::Response { status: into.head.status(), body: into.body.freeze() };
        }
        Ok(Err(e)) => e,
        Err(_) => UpstreamError::Timeout,
    };
    let reason = match error {
        UpstreamError::ConnectTimeout | UpstreamError::Timeout => "callout timed out",
        UpstreamError::Connect(_) => "callout service unreachable",
        UpstreamError::Handshake(_) => "callout TLS handshake failed",
        UpstreamError::Lost(_) => "callout service closed the connection",
        _ => "callout answer invalid",
    };
    crate::stats::WorkerStats::add(&worker.stats.callout_failures);
    tracing::warn!(callout = %c.name, error = %error, timeout = ?c.timeout, "{reason}");
    Answer::Failed(reason)
}

/// How often a request waiting for a key refetch looks whether it is done.
const REFETCH_POLL: Duration = Duration::from_millis(10);

/// Asks `providers` to fetch their keys again (each grants it at most once per `min_refetch`)
/// and waits, at most the longest `refetch_wait`, until the fetches it was granted (or joined)
/// are over.
async fn refetched(providers: &[std::sync::Arc<RemoteKeys>]) {
    let mut pending: Vec<(&RemoteKeys, u64)> =
        providers.iter().filter_map(|p| p.demand_refetch().map(|seen| (&**p, seen))).collect();
    let Some(wait) = pending.iter().map(|(p, _)| p.refetch_wait()).max() else { return };
    let deadline = Instant::now() + wait;
    loop {
        pending.retain(|(p, seen)| p.attempts() <= *seen);
        if pending.is_empty() || Instant::now() >= deadline {
            return;
        }
        monoio::time::sleep(REFETCH_POLL).await;
    }
}
