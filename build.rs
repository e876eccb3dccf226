//! Rebuilds the crate when a migration is added or edited: `embed_migrations!`
//! reads these directories at compile time, and cargo cannot see that.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=tests/migrations");
    println!("cargo:rerun-if-changed=examples/migrations");
}
