//! Compiles every `.proto` under `proto/` with protox (no `protoc` binary needed) and generates
//! tonic clients and servers with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["davit/raft.proto", "davit/cluster.proto", "davit/api.proto", "davit/agent.proto"];
    for file in files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
