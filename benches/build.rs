//! Compiles the minimal etcd API proto under `benches/proto/` with protox (no `protoc` binary
//! needed) into tonic clients, so the benchmark drives etcd with the same Rust gRPC stack it
//! uses for Davit.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["etcd/rpc.proto"];
    for file in files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(descriptors)?;
    Ok(())
}
