use std::fmt;

/// Whose fault an error was: it decides the log level (a client's mistakes are routine, a
/// backend's are an operator's concern, the proxy's own are bugs) and which side is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (downstream) sent something wrong, or went away.
    Client,
    /// The backend (upstream), or another service the proxy asked.
    Backend,
    /// The proxy itself.
    Internal,
}

/// What the proxy does about an error. (A refused TLS handshake has no reaction of the
/// proxy's choosing: BoringSSL sends the alert the protocol prescribes.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Answer with this status (a JSON body the client may read), then close.
    Respond(u16, &'static str),
    /// Close without a word: nobody is left to tell.
    Close,
}

/// Why a message head was refused. Each variant knows the status the proxy answers with; after
/// any of them the connection is closed, because the framing of what follows is in doubt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadError {
    /// The head is larger than the configured limit (431, or 502 for a backend's response).
    TooLarge,
    /// More header fields than the configured limit (431).
    TooManyHeaders,
    /// The head breaks RFC 9112 syntax or framing; the text says which rule, for the log.
    Malformed(&'static str),
    /// `Transfer-Encoding` names a coding other than `chunked` before the final `chunked` (501).
    UnsupportedTransferCoding,
    /// `Expect` with something other than `100-continue` (417).
    UnsupportedExpectation,
    /// A method the proxy does not forward (`CONNECT`) (405).
    MethodNotAllowed,
}

impl HeadError {
    /// What the proxy does when a client's request head has this error. (On a backend's
    /// response every head error is the backend's fault and a 502.)
    pub fn reaction(&self) -> Reaction {
        Reaction::Respond(self.status(), self.client_message())
    }

    /// The status code of the response the proxy sends for this error on a request.
    fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Malformed(_) => 400,
            HeadError::UnsupportedTransferCoding => 501,
            HeadError::UnsupportedExpectation => 417,
            HeadError::MethodNotAllowed => 405,
        }
    }

    /// The message put in the JSON body sent to the client: generic on purpose, the details go
    /// to the log only.
    fn client_message(&self) -> &'static str {
        match self {
            HeadError::TooLarge => "Request header fields too large",
            HeadError::TooManyHeaders => "Too many request header fields",
            HeadError::Malformed(_) => "Bad request",
            HeadError::UnsupportedTransferCoding => "Transfer coding not implemented",
            HeadError::UnsupportedExpectation => "Expectation failed",
            HeadError::MethodNotAllowed => "Method not allowed",
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => f.write_str("head exceeds the size limit"),
            HeadError::TooManyHeaders => f.write_str("too many header fields"),
            HeadError::Malformed(why) => write!(f, "malformed head: {why}"),
            HeadError::UnsupportedTransferCoding => f.write_str("transfer coding other than chunked"),
            HeadError::UnsupportedExpectation => f.write_str("unsupported expectation"),
            HeadError::MethodNotAllowed => f.write_str("method not allowed"),
        }
    }
}

impl std::error::Error for HeadError {}
