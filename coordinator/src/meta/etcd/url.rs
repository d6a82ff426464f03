//! Where a fleet's state is, and the TLS to reach it.

/// Where a fleet's state is: `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    /// The members' client addresses, `HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The fleet's prefix (no leading or trailing `/`).
    pub prefix: String,
}

/// A malformed `--meta` address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{url:?} is not an etcd address (etcd://HOST:PORT[,HOST:PORT…]/PREFIX): {why}")]
pub struct EtcdUrlError {
    url: String,
    why: &'static str,
}

impl std::str::FromStr for EtcdUrl {
    type Err = EtcdUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |why| EtcdUrlError {
            url: url.to_string(),
            why,
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it does not start with etcd://"))?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no prefix"))?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(bad("it names no prefix"));
        }
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(bad("the prefix has an empty, . or .. part"));
        }
        if prefix.chars().any(|c| c.is_control()) {
            return Err(bad("the prefix has a control character"));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = h
                .rsplit_once(':')
                .ok_or_else(|| bad("a member has no :PORT"))?;
            if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
                return Err(bad("a member's host is empty or malformed"));
            }
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("a member's port is not a number from 1 to 65535"))?;
            endpoints.push(h.to_string());
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: prefix.to_string(),
        })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}/{}", self.endpoints.join(","), self.prefix)
    }
}

/// TLS to etcd: the CA that signed the members' certificates, and this coordinator's
/// client certificate and key (PEM files).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA's certificate.
    pub ca: std::path::PathBuf,
    /// This coordinator's certificate.
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
}
