//! A fleet in failover: its first coordinator on etcd with a fleet key, standbys ready to
//! campaign on addresses the agents know from their start.

use super::*;

impl TestFleet {
    /// Starts a fleet in failover: its first coordinator (which leads, with `hooks`) keeps
    /// the fleet's state in etcd (`meta`) and its blobs in the bucket `s3`, heads are
    /// signed by a fleet key, `standbys` more coordinators are ready to campaign (on
    /// addresses the `n` agents know from their start; without hooks), and the agents
    /// trust the fleet key.
    pub async fn start_ha(
        n: usize,
        s3: voltool_agent::store::S3Options,
        meta: voltool_coordinator::MetaOptions,
        standbys: usize,
        hooks: voltool_coordinator::Hooks,
        limits: Limits,
    ) -> Self {
        let dir = test_dir();
        let fleet_dir = dir.path().join("fleet");
        let fleet_id = seed_key(&fleet_dir, 0xF1);
        let mut f = TestFleet {
            dir,
            coord: None,
            coord_listen: "127.0.0.1:0".parse().unwrap(),
            agents: Vec::new(),
            members: HashSet::new(),
            writers: None,
            limits,
            s3: Some(s3),
            meta,
            fleet_key: Some((fleet_dir.join("node.key"), fleet_id)),
            standbys: Vec::new(),
            hooks,
        };
        seed_key(&f.coord_dir(), 0xC0);
        for j in 0..standbys {
            let id = seed_key(&f.standby_dir(j), 0xD0 + j as u8);
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            f.standbys
                .push(voltool_agent::net::NodeAddr { id, addr: port });
        }
        for i in 0..n {
            f.members.insert(seed_key(&f.agent_dir(i), i as u8 + 1));
        }
        f.start_nodes(n).await
    }

    /// Data directory of standby coordinator `j`.
    pub fn standby_dir(&self, j: usize) -> PathBuf {
        self.dir.path().join(format!("coordinator-{}", j + 1))
    }

    /// Standby coordinator `j`'s options: the first's, on its own data directory and
    /// address.
    pub fn standby_options(&self, j: usize) -> CoordinatorOptions {
        CoordinatorOptions {
            data: self.standby_dir(j),
            listen: self.standbys[j].addr,
            hooks: Default::default(),
            ..self.coord_options()
        }
    }
}
