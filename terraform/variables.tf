variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-east-1"
}

variable "name" {
  description = "Name prefix of every resource (also the ElastiCache replication group id)."
  type        = string
  default     = "beach-road"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,27}[a-z0-9]$", var.name))
    error_message = "name: lowercase letters, digits and hyphens, 2-29 characters, starting with a letter (ALB and target group names are limited to 32 characters)."
  }
}

variable "tags" {
  description = "Extra tags for all resources."
  type        = map(string)
  default     = {}
}

# --- Network (existing VPC) ----------------------------------------------------------------------

variable "vpc_id" {
  description = "Existing VPC."
  type        = string
}

variable "public_subnet_ids" {
  description = "Subnets of the load balancer (public, at least two availability zones)."
  type        = list(string)

  validation {
    condition     = length(var.public_subnet_ids) >= 2
    error_message = "An ALB needs subnets in at least two availability zones."
  }
}

variable "private_subnet_ids" {
  description = "Subnets of the instances, of Redis and of the VPC interface endpoints: at least two, each in a different availability zone. No NAT gateway needed: the instances reach AWS through VPC endpoints only (endpoints.tf)."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "Multi-AZ Redis and the Auto Scaling group need subnets in at least two availability zones."
  }
}

variable "allowed_cidrs" {
  description = "Client networks allowed to reach the load balancer."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

# --- Public endpoint -----------------------------------------------------------------------------

variable "domain_name" {
  description = "Public host name of the service (point a DNS record at the ALB). Becomes BEACH_SESSION_SERVER=https://<domain_name>."
  type        = string
  default     = "road.example.com"
}

variable "certificate_arn" {
  description = "ACM certificate for domain_name, in the same region as the ALB."
  type        = string
}

variable "ssl_policy" {
  description = "TLS policy of the HTTPS listener."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"
}

# --- Instances -----------------------------------------------------------------------------------

variable "binary_url" {
  description = "Where instances fetch the beach-road binary (linux, matching the AMI's architecture and glibc): s3://bucket/key (read through the instance role) or an https:// URL."
  type        = string

  validation {
    condition     = can(regex("^(s3://[^/]+/.+|https://.+)$", var.binary_url))
    error_message = "binary_url must be s3://bucket/key or https://..."
  }
}

variable "binary_sha256" {
  description = "Optional SHA-256 of the binary; the instance refuses to install anything else."
  type        = string
  default     = ""

  validation {
    condition     = var.binary_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.binary_sha256))
    error_message = "binary_sha256: 64 lowercase hex digits, or empty."
  }
}

variable "ami_id" {
  description = "AMI of the instances. Empty: the latest official Debian 12 (amd64), whose glibc matches a binary built on Debian 12."
  type        = string
  default     = ""
}

variable "instance_type" {
  description = "EC2 instance type (its architecture must match the binary and the AMI)."
  type        = string
  default     = "t3.small"
}

variable "instance_port" {
  description = "Port beach-road listens on (BEACH_ROAD_PORT)."
  type        = number
  default     = 8080
}

variable "asg_min_size" {
  type    = number
  default = 2
}

variable "asg_max_size" {
  type    = number
  default = 6
}

variable "asg_desired_capacity" {
  type    = number
  default = 2
}

variable "asg_health_check_type" {
  description = "ELB: an instance failing /ready (after the grace period) is replaced, launch before terminate; also during a Redis outage longer than ~12 s, after which the fleet is replaced once Redis is back. EC2: only instances whose EC2 status checks fail are replaced (systemd restarts a stuck server either way). See README \"What heals\"."
  type        = string
  default     = "ELB"

  validation {
    condition     = contains(["ELB", "EC2"], var.asg_health_check_type)
    error_message = "asg_health_check_type: ELB or EC2."
  }
}

variable "asg_health_check_grace_period" {
  description = "Seconds after launch before the group acts on a failing health check: the boot (agents, binary, secrets) takes well under a minute, Redis may take longer to answer right after a failover."
  type        = number
  default     = 300
}

variable "refresh_checkpoint_percentages" {
  description = "Instance refresh: after replacing these percentages of the group it waits refresh_checkpoint_delay_seconds while the gating alarms watch. Ascending, the last one 100."
  type        = list(number)
  default     = [50, 100]

  validation {
    condition     = length(var.refresh_checkpoint_percentages) > 0 && try(var.refresh_checkpoint_percentages[length(var.refresh_checkpoint_percentages) - 1] == 100, false) && alltrue([for i in range(1, length(var.refresh_checkpoint_percentages)) : var.refresh_checkpoint_percentages[i - 1] <= var.refresh_checkpoint_percentages[i]]) && alltrue([for p in var.refresh_checkpoint_percentages : p > 0 && p <= 100])
    error_message = "refresh_checkpoint_percentages: ascending values in 1-100, the last one 100."
  }
}

variable "refresh_checkpoint_delay_seconds" {
  description = "Instance refresh: seconds to wait at each checkpoint (the gating alarms need a few 1-minute periods to see a bad release)."
  type        = number
  default     = 300
}

variable "scaling_cpu_target_percent" {
  description = "Target tracking: the group's average CPU utilization it keeps, scaling between asg_min_size and asg_max_size."
  type        = number
  default     = 60
}

variable "drain_delay_seconds" {
  description = "BEACH_ROAD_DRAIN_DELAY and the target group's deregistration delay. Keep it above the time the ALB needs to mark a target unhealthy (2 checks x 5 s + timeout)."
  type        = number
  default     = 30

  validation {
    condition     = var.drain_delay_seconds >= 15 && var.drain_delay_seconds <= 3600
    error_message = "drain_delay_seconds: 15-3600 (below 15 the ALB may still route new connections to a draining instance)."
  }
}

variable "drain_jitter_seconds" {
  description = "BEACH_ROAD_DRAIN_JITTER: window over which a draining instance closes its sockets."
  type        = number
  default     = 5
}

variable "extra_env" {
  description = "Further variables for /etc/beach-road/env (see deploy/env.example), e.g. { BEACH_ROAD_MAX_CONNECTIONS = \"30000\" }. No secrets: user data is readable by anyone allowed to describe the instances."
  type        = map(string)
  default     = {}

  validation {
    condition     = length(setintersection(keys(var.extra_env), ["BEACH_ROAD_SECRET", "BEACH_ROAD_SECRET_FILE"])) == 0
    error_message = "extra_env: the server secret comes from Secrets Manager (server_secret_version rotates it); never put it in user data."
  }
}

variable "server_secret_version" {
  description = "Generation of the server secret (the HMAC key of join codes). Raising it writes a new random value to Secrets Manager and, through the user data, replaces the instances so that they read it. Codes of sessions registered before then stop matching, and during the instance refresh old and new instances disagree: rotate when few sessions are live."
  type        = number
  default     = 1

  validation {
    condition     = var.server_secret_version >= 1 && floor(var.server_secret_version) == var.server_secret_version
    error_message = "server_secret_version: a whole number, 1 or more."
  }
}

# --- Redis ---------------------------------------------------------------------------------------

variable "redis_auth_token_secret_arn" {
  description = "ARN of an existing Secrets Manager secret whose SecretString is the Redis AUTH token (16-128 printable characters without / \" @ % or spaces). Empty: this stack makes the secret, with redis_auth_token or a random token. Either way the token ends up in the Terraform state (see secrets.tf)."
  type        = string
  default     = ""

  validation {
    condition     = var.redis_auth_token_secret_arn == "" || can(regex("^arn:[^:]+:secretsmanager:", var.redis_auth_token_secret_arn))
    error_message = "redis_auth_token_secret_arn: a Secrets Manager secret ARN, or empty."
  }
}

variable "redis_auth_token_kms_key_arn" {
  description = "KMS key of the secret in redis_auth_token_secret_arn, if it is not encrypted with the AWS managed key: the instance role may decrypt with it through Secrets Manager."
  type        = string
  default     = ""
}

variable "redis_auth_token_update_strategy" {
  description = "How a changed AUTH token is applied: ROTATE keeps the old token (or no-AUTH access) valid beside the new one, so running instances keep working through the refresh; SET, applied after the refresh, leaves only the new token."
  type        = string
  default     = "ROTATE"

  validation {
    condition     = contains(["ROTATE", "SET"], var.redis_auth_token_update_strategy)
    error_message = "redis_auth_token_update_strategy: ROTATE or SET."
  }
}

variable "redis_apply_immediately" {
  description = "Apply Redis changes at once rather than in the next maintenance window. True by default so that a new or changed AUTH token is in effect before the instance refresh that starts using it (Terraform waits for the modification); engine or node type changes then also happen at once (a failover per node)."
  type        = bool
  default     = true
}

variable "redis_at_rest_cmk" {
  description = "Encrypt Redis at rest with the stack's KMS key (true) or ElastiCache's default key (false). ElastiCache cannot change the key of an existing replication group: turning this on for a group made without it replaces the group, and every live session, room and mailbox is lost. Set false to upgrade such a deployment in place."
  type        = bool
  default     = true
}

variable "redis_auth_token" {
  description = "The Redis AUTH token itself (e.g. TF_VAR_redis_auth_token from a CI secret store), when redis_auth_token_secret_arn is empty. Null: a random 64-character token. Stored in a Secrets Manager secret of this stack, and in the state."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.redis_auth_token == null || can(regex("^[!#$&-.0-?A-~]{16,128}$", var.redis_auth_token))
    error_message = "redis_auth_token: 16-128 printable ASCII characters without /, \", @, % or spaces (ElastiCache's rule)."
  }
}

variable "redis_engine_version" {
  description = "ElastiCache Redis engine version (7.x). Redis Cluster mode needs 7 or later (sharded pub/sub: SSUBSCRIBE, SPUBLISH), which the 7.x rule below guarantees in both modes."
  type        = string
  default     = "7.1"

  validation {
    condition     = can(regex("^7\\.", var.redis_engine_version))
    error_message = "redis_engine_version must be 7.x."
  }
}

variable "redis_node_type" {
  type    = string
  default = "cache.t4g.small"
}

variable "redis_num_nodes" {
  description = "Single-node mode (redis_cluster_mode = false) only: number of cache nodes (primary + replicas); at least 2 for automatic failover."
  type        = number
  default     = 2

  validation {
    condition     = var.redis_num_nodes >= 2
    error_message = "Automatic failover and multi-AZ need at least 2 nodes."
  }
}

variable "redis_cluster_mode" {
  description = "Run Redis as a Redis Cluster (ElastiCache cluster mode enabled: redis_shards shards of one primary and redis_replicas_per_shard replicas each) instead of one primary with replicas (redis_num_nodes). The instances then get REDIS_URL=rediss+cluster://:<token>@<configuration endpoint>:6379. Changing it on an existing deployment replaces the replication group: every live session, room and mailbox is lost (README)."
  type        = bool
  default     = false
}

variable "redis_shards" {
  description = "Cluster mode only: number of shards (node groups); the 16384 hash slots are spread over them. ElastiCache allows at most 500 nodes in a cluster (shards x (1 + replicas)); the default quota is 90."
  type        = number
  default     = 3

  validation {
    condition     = var.redis_shards == floor(var.redis_shards) && var.redis_shards >= 1 && var.redis_shards <= 500
    error_message = "redis_shards: a whole number from 1 to 500."
  }
  validation {
    condition     = !var.redis_cluster_mode || var.redis_shards * (var.redis_replicas_per_shard + 1) <= 500
    error_message = "redis_shards x (1 + redis_replicas_per_shard): at most 500 nodes in an ElastiCache cluster."
  }
}

variable "redis_replicas_per_shard" {
  description = "Cluster mode only: replicas of each shard's primary, in other AZs. At least 1 in cluster mode: automatic failover and multi-AZ are always on, and a shard without a replica has nothing to fail over to."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_replicas_per_shard == floor(var.redis_replicas_per_shard) && var.redis_replicas_per_shard >= 0 && var.redis_replicas_per_shard <= 5
    error_message = "redis_replicas_per_shard: a whole number from 0 to 5."
  }
  validation {
    condition     = !var.redis_cluster_mode || var.redis_replicas_per_shard >= 1
    error_message = "redis_replicas_per_shard: at least 1 in cluster mode (automatic failover and multi-AZ need a replica in every shard)."
  }
}

# --- Network egress ------------------------------------------------------------------------------

variable "create_vpc_endpoints" {
  description = "Create the VPC endpoints the instances use (interface: secretsmanager, logs, and ssm, ssmmessages, ec2messages with install_ssm_agent; gateway: s3). False when the VPC has them already: the instances then reach HTTPS inside the VPC CIDR and S3's prefix list."
  type        = bool
  default     = true
}

variable "private_route_table_ids" {
  description = "Route tables of private_subnet_ids, for the S3 gateway endpoint. Null: looked up from the subnets (each must have an explicit route table association)."
  type        = list(string)
  default     = null
}

variable "extra_https_egress_cidrs" {
  description = "Extra HTTPS destinations of the instances, e.g. the host of an https:// binary_url outside AWS (which also needs a NAT gateway). Empty by default: instances reach AWS endpoints only."
  type        = list(string)
  default     = []
}

variable "install_ssm_agent" {
  description = "Install the SSM agent at boot (Session Manager shell access, no SSH) unless the image has it, and create its VPC endpoints."
  type        = bool
  default     = true
}

# --- Logs ----------------------------------------------------------------------------------------

variable "log_retention_days" {
  description = "Retention of the instances' log group. The server's lines carry client IP addresses: keep it as short as your operations allow."
  type        = number
  default     = 30
}

variable "alb_deletion_protection" {
  description = "Deletion protection of the load balancer (turn it off, apply, then destroy)."
  type        = bool
  default     = true
}

variable "alb_log_retention_days" {
  description = "Days the ALB access logs are kept in their bucket."
  type        = number
  default     = 90
}

# --- Alarms --------------------------------------------------------------------------------------

variable "alarm_emails" {
  description = "E-mail addresses subscribed to the alarm topic (each must confirm the subscription)."
  type        = list(string)
  default     = []
}

variable "alarm_elb_5xx_per_minute" {
  description = "HTTPCode_ELB_5XX_Count per minute above which the load balancer alarm fires (3 of 5 minutes). Gates instance refreshes."
  type        = number
  default     = 10
}

variable "alarm_target_5xx_per_minute" {
  description = "HTTPCode_Target_5XX_Count per minute above which the instances' 5xx alarm fires (3 of 5 minutes). Gates instance refreshes."
  type        = number
  default     = 10
}

variable "alarm_p99_response_seconds" {
  description = "p99 TargetResponseTime (seconds) above which the latency alarm fires (3 of 5 minutes)."
  type        = number
  default     = 1
}

variable "alarm_redis_cpu_percent" {
  description = "EngineCPUUtilization (%) of a Redis node above which its alarm fires."
  type        = number
  default     = 80
}

variable "alarm_redis_memory_percent" {
  description = "DatabaseMemoryUsagePercentage of a Redis node above which its alarm fires (at 100 % new sessions are refused: noeviction)."
  type        = number
  default     = 80
}

variable "alarm_redis_max_connections" {
  description = "CurrConnections of a Redis node above which its alarm fires (each instance holds a handful)."
  type        = number
  default     = 1000
}

variable "alarm_server_error_lines_per_5min" {
  description = "ERROR lines logged by all servers together per 5 minutes above which the log alarm fires."
  type        = number
  default     = 10
}

# --- WAF -----------------------------------------------------------------------------------------

variable "waf_rate_limit_per_5min" {
  description = "Requests one client address may send in 5 minutes before WAF blocks it for a while (HTTP calls, mailbox polls and WebSocket upgrades; not the frames of open sockets). Far above one user's needs, so that many users behind one NAT pass."
  type        = number
  default     = 10000

  validation {
    condition     = var.waf_rate_limit_per_5min >= 100
    error_message = "waf_rate_limit_per_5min: at least 100."
  }
}

variable "waf_block_anonymous_ips" {
  description = "Block (true) or only count (false) requests from AWS's anonymous-IP list: Tor, anonymizing VPNs and proxies, and hosting providers (cloud VMs, where many beach users run)."
  type        = bool
  default     = false
}

variable "metrics_scraper_cidrs" {
  description = "IPv4 CIDRs inside the VPC whose Prometheus scrapes GET /metrics on each instance directly (the instances' --metrics-allow default admits the private ranges). Empty: no scraper ingress."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.metrics_scraper_cidrs : can(cidrhost(c, 0))])
    error_message = "Each entry must be an IPv4 CIDR."
  }
}
