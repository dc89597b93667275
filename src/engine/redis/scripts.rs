//! The Lua scripts of `lua/`, one per multi-step operation (each file's header names its KEYS,
//! ARGV and reply). `Script::invoke_async` sends EVALSHA and reloads the script on NOSCRIPT, so
//! a Redis restart or `SCRIPT FLUSH` is harmless.

use redis::Script;

const CODE_CHECK: &str = include_str!("../../../lua/code_check.lua");
const JOIN: &str = include_str!("../../../lua/join.lua");

/// `lua/code_join.lua` with the two scripts it runs in one step as its local functions.
fn code_join() -> String {
    format!(
        "local function code_check(KEYS, ARGV)\n{CODE_CHECK}end\n\
         local function join(KEYS, ARGV)\n{JOIN}end\n{}",
        include_str!("../../../lua/code_join.lua")
    )
}

pub(crate) struct Scripts {
    pub register: Script,
    pub token_quota: Script,
    pub token_put: Script,
    pub token_bind: Script,
    pub code_check: Script,
    pub rate: Script,
    pub offer_push: Script,
    pub offer_pop: Script,
    pub answer_put: Script,
    pub answer_take: Script,
    pub join: Script,
    pub code_join: Script,
    pub leave: Script,
    pub touch: Script,
    pub instance_register: Script,
    pub heartbeat: Script,
    pub deregister: Script,
    pub reap_claim: Script,
    pub reap_lease: Script,
    pub close: Script,
    pub token_take: Script,
    pub relay_arrive: Script,
    pub relay_forget: Script,
    pub relay_mark: Script,
    pub relay_unmark: Script,
}

impl Scripts {
    pub(crate) fn load() -> Self {
        Self {
            register: Script::new(include_str!("../../../lua/register.lua")),
            token_quota: Script::new(include_str!("../../../lua/token_quota.lua")),
            token_put: Script::new(include_str!("../../../lua/token_put.lua")),
            token_bind: Script::new(include_str!("../../../lua/token_bind.lua")),
            code_check: Script::new(CODE_CHECK),
            rate: Script::new(include_str!("../../../lua/rate.lua")),
            offer_push: Script::new(include_str!("../../../lua/offer_push.lua")),
            offer_pop: Script::new(include_str!("../../../lua/offer_pop.lua")),
            answer_put: Script::new(include_str!("../../../lua/answer_put.lua")),
            answer_take: Script::new(include_str!("../../../lua/answer_take.lua")),
            join: Script::new(JOIN),
            code_join: Script::new(&code_join()),
            leave: Script::new(include_str!("../../../lua/leave.lua")),
            touch: Script::new(include_str!("../../../lua/touch.lua")),
            instance_register: Script::new(include_str!("../../../lua/instance_register.lua")),
            heartbeat: Script::new(include_str!("../../../lua/heartbeat.lua")),
            deregister: Script::new(include_str!("../../../lua/deregister.lua")),
            reap_claim: Script::new(include_str!("../../../lua/reap_claim.lua")),
            reap_lease: Script::new(include_str!("../../../lua/reap_lease.lua")),
            close: Script::new(include_str!("../../../lua/close.lua")),
            token_take: Script::new(include_str!("../../../lua/token_take.lua")),
            relay_arrive: Script::new(include_str!("../../../lua/relay_arrive.lua")),
            relay_forget: Script::new(include_str!("../../../lua/relay_forget.lua")),
            relay_mark: Script::new(include_str!("../../../lua/relay_mark.lua")),
            relay_unmark: Script::new(include_str!("../../../lua/relay_unmark.lua")),
        }
    }
}
