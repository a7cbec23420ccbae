//! portcullis-tls
