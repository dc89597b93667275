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
  description = "Subnets of the instances and of Redis (at least two AZs). The instances need outbound HTTPS (NAT gateway or VPC endpoints) to fetch the binary and packages."
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

variable "redis_engine_version" {
  description = "ElastiCache Redis engine version (7.x)."
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
  description = "Number of cache nodes (primary + replicas); at least 2 for automatic failover."
  type        = number
  default     = 2

  validation {
    condition     = var.redis_num_nodes >= 2
    error_message = "Automatic failover and multi-AZ need at least 2 nodes."
  }
}
