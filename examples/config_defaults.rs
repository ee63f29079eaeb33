//! Prints every configuration key keel knows, with its default, as TOML.
//!
//!     cargo run --example config_defaults
fn main() {
    print!("{}", keel::default_config_toml());
}
