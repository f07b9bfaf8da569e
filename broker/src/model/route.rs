//! What a worker announces to the cluster about its subscriptions.

/// A route as announced between workers: a filter, and the group for a shared subscription.
/// Workers announce a route when its first local subscription appears and withdraw it when
/// the last one goes, so the cluster hears of each route once per worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub filter: Box<str>,
    pub group: Option<Box<str>>,
}

/// A shared subscription group (`$share/{group}/{filter}`) that one worker was picked to
/// serve for one message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedTarget {
    pub group: Box<str>,
    pub filter: Box<str>,
}
