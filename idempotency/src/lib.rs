//! keel-idempotency. This crate is filled in by its own issue.
#![forbid(unsafe_code)]
