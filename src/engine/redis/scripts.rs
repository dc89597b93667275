//! The Lua scripts of `lua/`, one per multi-step operation (each file's header names its KEYS,
//! ARGV and reply). `Script::invoke_async` sends EVALSHA and reloads the script on NOSCRIPT, so
//! a Redis restart or `SCRIPT FLUSH` is harmless.

use redis::Script;

pub(crate) struct Scripts {
    pub register: Script,
    pub attach: Script,
    pub code_failure: Script,
    pub offer_push: Script,
    pub offer_pop: Script,
    pub answer_take: Script,
    pub join: Script,
    pub leave: Script,
    pub instance_register: Script,
    pub heartbeat: Script,
    pub deregister: Script,
    pub reap_claim: Script,
    pub reap_lease: Script,
}

impl Scripts {
    pub(crate) fn load() -> Self {
        Self {
            register: Script::new(include_str!("../../../lua/register.lua")),
            attach: Script::new(include_str!("../../../lua/attach.lua")),
            code_failure: Script::new(include_str!("../../../lua/code_failure.lua")),
            offer_push: Script::new(include_str!("../../../lua/offer_push.lua")),
            offer_pop: Script::new(include_str!("../../../lua/offer_pop.lua")),
            answer_take: Script::new(include_str!("../../../lua/answer_take.lua")),
            join: Script::new(include_str!("../../../lua/join.lua")),
            leave: Script::new(include_str!("../../../lua/leave.lua")),
            instance_register: Script::new(include_str!("../../../lua/instance_register.lua")),
            heartbeat: Script::new(include_str!("../../../lua/heartbeat.lua")),
            deregister: Script::new(include_str!("../../../lua/deregister.lua")),
            reap_claim: Script::new(include_str!("../../../lua/reap_claim.lua")),
            reap_lease: Script::new(include_str!("../../../lua/reap_lease.lua")),
        }
    }
}
