//! Raft's RPCs as typed mesh endpoints (`consensus/<group>/vote|append|snapshot`), over the
//! peers' persistent mutual-TLS sessions.

use std::sync::Arc;
use std::time::Duration;

use causeway_mesh::rpc::{CallError, Endpoint, Rpc};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::EmptyNode;

use crate::{MemberId, TypeConfig};

/// The three endpoints of one group.
#[derive(Clone)]
pub(crate) struct Endpoints {
    pub vote: Endpoint<VoteRequest<MemberId>, VoteResponse<MemberId>>,
    pub append: Endpoint<AppendEntriesRequest<TypeConfig>, AppendEntriesResponse<MemberId>>,
    pub snapshot: Endpoint<InstallSnapshotRequest<TypeConfig>, InstallSnapshotResponse<MemberId>>,
}

impl Endpoints {
    pub(crate) fn of(group: &str) -> Self {
        Self {
            vote: Endpoint::new(format!("consensus/{group}/vote")),
            append: Endpoint::new(format!("consensus/{group}/append")),
            snapshot: Endpoint::new(format!("consensus/{group}/snapshot")),
        }
    }

    pub(crate) fn paths(&self) -> [&str; 3] {
        [self.vote.path(), self.append.path(), self.snapshot.path()]
    }
}

#[derive(Clone)]
pub(crate) struct MeshNetwork {
    pub rpc: Arc<Rpc>,
    pub endpoints: Endpoints,
    /// The wait before a failed RPC is retried: one heartbeat, so a member that comes back
    /// hears the leader before its election timer runs out.
    pub retry: Duration,
}

pub(crate) struct Connection {
    net: MeshNetwork,
    target: usize,
}

impl RaftNetworkFactory<TypeConfig> for MeshNetwork {
    type Network = Connection;

    async fn new_client(&mut self, target: MemberId, _node: &EmptyNode) -> Connection {
        Connection {
            net: self.clone(),
            target: target as usize,
        }
    }
}

/// Every failure is reported as "unreachable", so openraft waits [`MeshNetwork::retry`]
/// before trying again: its other error kinds are retried at once, and a peer that answers
/// "starting" in its quiet time would be asked again in a busy loop.
fn rpc_error<E: std::error::Error>(e: CallError) -> RPCError<MemberId, EmptyNode, E> {
    RPCError::Unreachable(Unreachable::new(&e))
}

/// The caller's budget for one RPC, never zero.
fn ttl(option: &RPCOption) -> Duration {
    option.hard_ttl().max(Duration::from_millis(10))
}

impl RaftNetwork<TypeConfig> for Connection {
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.net.retry))
    }

    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RPCError<MemberId, EmptyNode, RaftError<MemberId>>>
    {
        let ep = &self.net.endpoints.append;
        self.net
            .rpc
            .call(ep, self.target, &req, ttl(&option))
            .await
            .map_err(rpc_error)
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<MemberId>,
        RPCError<MemberId, EmptyNode, RaftError<MemberId, InstallSnapshotError>>,
    > {
        let ep = &self.net.endpoints.snapshot;
        self.net
            .rpc
            .call(ep, self.target, &req, ttl(&option))
            .await
            .map_err(rpc_error)
    }

    async fn vote(
        &mut self,
        req: VoteRequest<MemberId>,
        option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, RPCError<MemberId, EmptyNode, RaftError<MemberId>>> {
        let ep = &self.net.endpoints.vote;
        self.net
            .rpc
            .call(ep, self.target, &req, ttl(&option))
            .await
            .map_err(rpc_error)
    }
}
