# Egress of the instances, narrowed to what they use, at boot and after:
#   - Redis, 6379, to the Redis security group (main.tf);
#   - HTTPS to the interface VPC endpoints (Secrets Manager for both secrets, CloudWatch Logs for
#     the journal, and ssm / ssmmessages / ec2messages for Session Manager);
#   - HTTPS to S3 through its gateway endpoint (the region's S3 prefix list): the binary (s3://),
#     and the CloudWatch and SSM agents' Debian packages, which AWS publishes in public buckets of
#     each region;
#   - nothing else. No NAT gateway or internet route is needed, and none is used if present.
# Not filtered by security groups at all, so no rule is needed: the VPC's DNS resolver
# (AmazonProvidedDNS), the instance metadata service (role credentials, IMDSv2) and the Amazon
# Time Sync Service (169.254.169.123, which the user data makes the instances' NTP server).
# An https:// binary_url outside AWS needs its addresses in extra_https_egress_cidrs (and a NAT).
#
# The boot needs no wider egress than this: it installs no Debian package (no mirror), and reads
# secrets and objects with templates/aws_fetch.py (signed requests to the regional endpoints).
# Consequence: instances get no Debian updates while they run. They are immutable instead: a new
# Debian AMI (the newest one is picked on every apply unless ami_id is set) changes the launch
# template, and the instance refresh replaces them.
#
# Interface endpoints with private DNS serve the whole VPC, and a VPC can hold only one per
# service with private DNS: if the VPC already has them (or an S3 gateway endpoint on these route
# tables), set create_vpc_endpoints = false; the instances then reach HTTPS only inside the VPC's
# CIDR (where those endpoints are) and S3's prefix list. The endpoint policies are left at their
# default (full access) for that reason too: other workloads of the VPC go through them. What the
# instances may do is limited by their role instead.

locals {
  interface_endpoints = var.create_vpc_endpoints ? toset(concat(
    ["secretsmanager", "logs"],
    var.install_ssm_agent ? ["ssm", "ssmmessages", "ec2messages"] : [],
  )) : toset([])

  route_table_ids = var.private_route_table_ids != null ? var.private_route_table_ids : distinct([for rt in data.aws_route_table.private : rt.id])
}

# The route tables of the instances' subnets (for the S3 gateway endpoint), unless given.
data "aws_route_table" "private" {
  for_each  = var.create_vpc_endpoints && var.private_route_table_ids == null ? toset(var.private_subnet_ids) : toset([])
  subnet_id = each.value
}

data "aws_vpc" "this" {
  count = var.create_vpc_endpoints ? 0 : 1
  id    = var.vpc_id
}

# The region's S3 addresses, as routed by a gateway endpoint.
data "aws_ec2_managed_prefix_list" "s3" {
  name = "com.amazonaws.${var.region}.s3"
}

resource "aws_security_group" "endpoints" {
  count       = var.create_vpc_endpoints ? 1 : 0
  name        = "${var.name}-endpoints"
  description = "beach-road VPC interface endpoints"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_instances" {
  count                        = var.create_vpc_endpoints ? 1 : 0
  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "HTTPS from beach-road instances"
  referenced_security_group_id = aws_security_group.instance.id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

resource "aws_vpc_endpoint" "interface" {
  for_each            = local.interface_endpoints
  vpc_id              = var.vpc_id
  service_name        = "com.amazonaws.${var.region}.${each.key}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = var.private_subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
  tags                = { Name = "${var.name}-${each.key}" }
}

resource "aws_vpc_endpoint" "s3" {
  count             = var.create_vpc_endpoints ? 1 : 0
  vpc_id            = var.vpc_id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = local.route_table_ids
  tags              = { Name = "${var.name}-s3" }
}

# --- Instance egress besides Redis ---------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "instance_to_endpoints" {
  security_group_id            = aws_security_group.instance.id
  description                  = "HTTPS to the VPC interface endpoints (Secrets Manager, Logs, SSM)"
  referenced_security_group_id = var.create_vpc_endpoints ? aws_security_group.endpoints[0].id : null
  cidr_ipv4                    = var.create_vpc_endpoints ? null : data.aws_vpc.this[0].cidr_block
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

resource "aws_vpc_security_group_egress_rule" "instance_to_s3" {
  security_group_id = aws_security_group.instance.id
  description       = "HTTPS to S3 through the gateway endpoint (binary, agent packages)"
  prefix_list_id    = data.aws_ec2_managed_prefix_list.s3.id
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "instance_extra_https" {
  for_each          = toset(var.extra_https_egress_cidrs)
  security_group_id = aws_security_group.instance.id
  description       = "HTTPS to an https:// binary_url outside AWS"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}
