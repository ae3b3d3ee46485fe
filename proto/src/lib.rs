//! Protocol buffers shared by the coordinator and the agent, and the tonic/prost code generated
//! from them. Nothing else lives here: conversions to domain types belong to the crate that
//! owns the domain.

pub mod raft {
    tonic::include_proto!("davit.raft.v1");
}

pub mod cluster {
    tonic::include_proto!("davit.cluster.v1");
}

pub mod api {
    tonic::include_proto!("davit.api.v1");
}

pub mod agent {
    tonic::include_proto!("davit.agent.v1");
}
