//! keel facade.
#![forbid(unsafe_code)]
