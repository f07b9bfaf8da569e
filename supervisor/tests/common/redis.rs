//! A real `redis-server` (Debian's), started by the test on a free port and stopped by
//! PID. `.ci/run` installs it (tests/run-all.sh).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    durable: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl RedisServer {
    /// A throwaway Redis (no persistence).
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port(), false)
    }

    /// A Redis that writes every command to its append-only file before answering
    /// (`appendfsync always`): what it acknowledged survives a restart.
    pub fn start_durable() -> RedisServer {
        RedisServer::start_on(free_port(), true)
    }

    fn start_on(port: u16, durable: bool) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("mqttd-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            durable,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&self.dir);
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `--set` overrides that put a broker on this Redis.
    pub fn broker_sets(&self) -> Vec<String> {
        vec![
            "cluster.backend=\"redis\"".into(),
            format!("redis.url=\"{}\"", self.url()),
        ]
    }

    /// Runs `redis-cli` against this server; its trimmed output, or `None` if it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Kills the server (SIGKILL: nothing flushed beyond what it already wrote) and starts
    /// it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `redis-server` of a [`RedisClusterServers`]: its own port and directory (its
/// `nodes.conf` and append-only file), so that it can be killed and started again as the
/// same cluster node.
struct ClusterNode {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl ClusterNode {
    fn spawn(&mut self) {
        let conf = self.dir.join(format!("nodes-{}.conf", self.port));
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(&conf)
            .args(["--cluster-node-timeout", "5000"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while cli(self.port, &["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server :{} did not answer",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: nothing flushed beyond what it already wrote (with `appendfsync always`,
    /// everything it acknowledged).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `redis-cli -p port ARGS`; its trimmed output, or `None` if it failed.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One line of `CLUSTER NODES`: who a node is and what it serves.
#[derive(Debug, Clone)]
pub struct ClusterNodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served (masters), inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// A Redis Cluster of real `redis-server`s on free ports, each stopped by PID when this
/// is dropped: three masters, and a replica for each if asked (so that a replica can take
/// over with `CLUSTER FAILOVER`). Every server is durable (`appendfsync always`).
pub struct RedisClusterServers {
    nodes: Vec<ClusterNode>,
    base: PathBuf,
}

impl RedisClusterServers {
    /// Three masters.
    pub fn start() -> RedisClusterServers {
        RedisClusterServers::start_with(0)
    }

    /// Three masters with one replica each (six servers).
    pub fn start_with_replicas() -> RedisClusterServers {
        RedisClusterServers::start_with(1)
    }

    fn start_with(replicas: usize) -> RedisClusterServers {
        let count = 3 * (1 + replicas);
        let ports: Vec<u16> = {
            // Held together so that no two are the same.
            let listeners: Vec<TcpListener> = (0..count)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("free port"))
                .collect();
            listeners
                .iter()
                .map(|l| l.local_addr().expect("port").port())
                .collect()
        };
        // A cluster node listens on port + 10000 too (the cluster bus).
        assert!(ports.iter().all(|&p| p < 55535), "bus port out of range");
        let base = std::env::temp_dir().join(format!(
            "mqttd-redis-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        let mut cluster = RedisClusterServers {
            nodes: Vec::new(),
            base: base.clone(),
        };
        for port in ports {
            let dir = base.join(port.to_string());
            std::fs::create_dir_all(&dir).expect("redis dir");
            let mut node = ClusterNode {
                child: None,
                port,
                dir,
            };
            node.spawn();
            cluster.nodes.push(node);
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_settled("the cluster to form", |nodes| {
            nodes.iter().filter(|n| n.master).count() == 3
                && nodes.iter().filter(|n| !n.master).count() == 3 * replicas
        });
        cluster
    }

    /// The ports of every server (masters first, as created).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// `--set` overrides that put a broker on this cluster: the masters as seed URLs (a
    /// TOML list).
    pub fn broker_sets(&self) -> Vec<String> {
        let seeds: Vec<String> = self
            .urls()
            .iter()
            .take(3)
            .map(|u| format!("\"{u}\""))
            .collect();
        vec![
            "cluster.backend=\"redis\"".into(),
            format!("redis.url=[{}]", seeds.join(",")),
        ]
    }

    /// Runs `redis-cli -p port ARGS` (no redirections followed).
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        cli(port, args)
    }

    /// `CLUSTER NODES` as the server on `port` sees it (`None` if it does not answer).
    pub fn nodes_seen_by(&self, port: u16) -> Option<Vec<ClusterNodeInfo>> {
        let out = cli(port, &["CLUSTER", "NODES"])?;
        let mut nodes = Vec::new();
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            // ip:port@cport[,hostname]
            let port = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())?;
            let flags: Vec<&str> = f[2].split(',').collect();
            if flags
                .iter()
                .any(|&fl| fl == "fail" || fl == "fail?" || fl == "handshake")
            {
                return None;
            }
            let master = flags.contains(&"master");
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            nodes.push(ClusterNodeInfo {
                id: f[0].to_string(),
                port,
                master,
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                slots,
            });
        }
        Some(nodes)
    }

    /// Waits (bounded) until every server says `cluster_state:ok`, they all see the same
    /// masters (with every slot served and no node failing), and `settled` holds for that
    /// view.
    fn wait_settled(&self, what: &str, settled: impl Fn(&[ClusterNodeInfo]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(view) = self.agreed_view() {
                if settled(&view) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.ports()
                    .iter()
                    .map(|&p| (p, cli(p, &["CLUSTER", "NODES"])))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cluster as every server sees it, if they all agree and all say it is ok.
    fn agreed_view(&self) -> Option<Vec<ClusterNodeInfo>> {
        // Each server's view, reduced to who is a master of what.
        type Roles = Vec<(u16, bool, Vec<(u16, u16)>)>;
        let mut agreed: Option<Roles> = None;
        let mut view = None;
        for node in &self.nodes {
            let info = cli(node.port, &["CLUSTER", "INFO"])?;
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return None;
            }
            let nodes = self.nodes_seen_by(node.port)?;
            let served: usize = nodes
                .iter()
                .flat_map(|n| &n.slots)
                .map(|&(a, b)| usize::from(b - a) + 1)
                .sum();
            if served != 16384 || nodes.len() != self.nodes.len() {
                return None;
            }
            let mut key: Vec<_> = nodes
                .iter()
                .map(|n| (n.port, n.master, n.slots.clone()))
                .collect();
            key.sort();
            match &agreed {
                None => agreed = Some(key),
                Some(k) if *k == key => {}
                Some(_) => return None,
            }
            view = Some(nodes);
        }
        view
    }

    /// The port of the master that serves `key` now.
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.nodes[0].port;
        let nodes = self
            .agreed_view()
            .or_else(|| self.nodes_seen_by(port))
            .expect("cluster nodes");
        let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.parse().ok())
            .expect("CLUSTER KEYSLOT");
        nodes
            .iter()
            .find(|n| n.master && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {nodes:?}"))
    }

    /// Kills the server on `port` (SIGKILL) and starts it again on the same port and
    /// directory: it rejoins as the node it was, with its data from the append-only file.
    /// Returns once the whole cluster says it is ok again.
    pub fn restart(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a server of this cluster");
        node.kill();
        node.spawn();
        self.wait_settled("the restarted server to rejoin", |_| true);
    }

    /// Has the replica of the master on `master_port` take over (`CLUSTER FAILOVER`, the
    /// coordinated kind: the master stops taking writes until its replica has them all).
    /// Returns the new master's port once every server agrees it is the master.
    pub fn failover(&mut self, master_port: u16) -> u16 {
        let view = self.agreed_view().expect("a settled cluster");
        let master = view
            .iter()
            .find(|n| n.port == master_port && n.master)
            .expect("a master");
        let replica = view
            .iter()
            .find(|n| n.master_id.as_deref() == Some(master.id.as_str()))
            .expect("the master has a replica")
            .port;
        let reply = cli(replica, &["CLUSTER", "FAILOVER"]);
        assert_eq!(
            reply.as_deref(),
            Some("OK"),
            "CLUSTER FAILOVER on :{replica}"
        );
        self.wait_settled("the replica to take over", |nodes| {
            nodes.iter().any(|n| n.port == replica && n.master)
                && nodes.iter().any(|n| n.port == master_port && !n.master)
        });
        replica
    }
}

impl Drop for RedisClusterServers {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
