//! Compiles the control API (`control/v1/*.proto`) with protox: no system
//! `protoc` needed on any machine that builds the project.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["common.proto", "agent.proto", "relay.proto"];
    for f in files {
        println!("cargo:rerun-if-changed=control/v1/{f}");
    }
    let descriptors = protox::compile(files, ["control/v1"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
