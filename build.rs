//! Records the git commit the binary was built from, for `haconfd version`. A build without the
//! repository's .git (a container build) passes it as `HACONFD_GIT_COMMIT` instead.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=HACONFD_GIT_COMMIT");
    let given = std::env::var("HACONFD_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = given.unwrap_or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    });
    println!("cargo:rustc-env=HACONFD_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
