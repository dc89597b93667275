output "alb_dns_name" {
  description = "Point a DNS record for domain_name at this (CNAME, or a Route 53 alias with alb_zone_id)."
  value       = aws_lb.this.dns_name
}

output "alb_zone_id" {
  value = aws_lb.this.zone_id
}

output "public_url" {
  description = "BEACH_SESSION_SERVER of every instance; give it to beach clients."
  value       = "https://${var.domain_name}"
}

output "websocket_base_url" {
  value = "wss://${var.domain_name}/ws"
}

output "server_secret_arn" {
  description = "The Secrets Manager secret the instances read their server secret from (the ARN, not the value)."
  value       = aws_secretsmanager_secret.server_secret.arn
}

output "redis_endpoint" {
  description = "The Redis endpoint the instances connect to (port 6379, TLS, AUTH): the primary endpoint (REDIS_URL rediss://), or in cluster mode the configuration endpoint (rediss+cluster://)."
  value       = local.redis_host
}

output "redis_primary_endpoint" {
  description = "Single-node mode: the primary endpoint (null in cluster mode: see redis_endpoint)."
  value       = var.redis_cluster_mode ? null : aws_elasticache_replication_group.redis.primary_endpoint_address
}

output "target_group_arn" {
  value = aws_lb_target_group.road.arn
}

output "autoscaling_group_name" {
  value = aws_autoscaling_group.road.name
}

output "redis_auth_secret_arn" {
  description = "The Secrets Manager secret holding the Redis AUTH token (the ARN, not the value)."
  value       = local.redis_auth_secret_arn
}

output "alarm_topic_arn" {
  description = "SNS topic (KMS-encrypted) of every alarm; subscribe on-call tooling to it (alarm_emails for e-mail)."
  value       = aws_sns_topic.alarms.arn
}

output "log_group_name" {
  description = "CloudWatch Logs group of the instances: streams <instance id>/beach-road (server JSON lines), /journal, /bootstrap."
  value       = aws_cloudwatch_log_group.instances.name
}

output "alb_access_logs_bucket" {
  value = aws_s3_bucket.alb_logs.id
}

output "kms_key_arn" {
  value = aws_kms_key.this.arn
}
