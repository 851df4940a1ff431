// The test embeds ../migrations with `sqlx::migrate!`; rebuild when a file there is added
// or changed (sqlx's documented build script).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
