#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/ptt-relay.json (run after changing the
panels; the JSON is committed). Every metric used here must be in
docs/metrics.md: relay/tests/metrics.rs checks that."""
import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}
J = 'instance=~"$instance"'

def q(expr, legend):
    return {"expr": expr, "legendFormat": legend, "datasource": DS}

def hq(metric, quant):
    return q(f'histogram_quantile({quant}, sum by (le) (rate({metric}_bucket{{{J}}}[$__rate_interval])))',
             f"p{int(quant * 100)}")

PANELS = [
    ("Row: traffic", None, None),
    ("Clips accepted / s", "ops", [q(f'sum by (target) (rate(ptt_clips_accepted_total{{{J}}}[$__rate_interval]))', "{{target}}"),
                                  q(f'sum(rate(ptt_clips_duplicate_total{{{J}}}[$__rate_interval]))', "duplicate retries")]),
    ("Clips refused / s by reason", "ops", [q(f'sum by (reason) (rate(ptt_clips_rejected_total{{{J}}}[$__rate_interval]))', "{{reason}}")]),
    ("Deliveries / s", "ops", [q(f'sum by (path) (rate(ptt_deliveries_total{{{J}}}[$__rate_interval]))', "started {{path}}"),
                              q(f'sum(rate(ptt_clips_delivered_total{{{J}}}[$__rate_interval]))', "acknowledged"),
                              q(f'sum(rate(ptt_live_fallbacks_total{{{J}}}[$__rate_interval]))', "live queue full"),
                              q(f'sum by (reason) (rate(ptt_clips_cut_total{{{J}}}[$__rate_interval]))', "cut: {{reason}}")]),
    ("Packets / s", "pps", [q(f'sum(rate(ptt_packets_in_total{{{J}}}[$__rate_interval]))', "in"),
                           q(f'sum(rate(ptt_packets_out_total{{{J}}}[$__rate_interval]))', "out")]),
    ("Voice bytes / s", "Bps", [q(f'sum(rate(ptt_bytes_in_total{{{J}}}[$__rate_interval]))', "in"),
                               q(f'sum(rate(ptt_bytes_out_total{{{J}}}[$__rate_interval]))', "out")]),
    ("Wire bytes / s (UDP payload, all users)", "Bps", [q(f'sum by (direction) (rate(ptt_wire_bytes_total{{{J}}}[$__rate_interval]))', "{{direction}}")]),
    ("Row: latency", None, None),
    ("Relay hop (live packet, sender stream to recipient stream)", "s", [hq("ptt_relay_hop_seconds", 0.5), hq("ptt_relay_hop_seconds", 0.99)]),
    ("Sender ack (clip end to Accepted)", "s", [hq("ptt_sender_ack_seconds", 0.5), hq("ptt_sender_ack_seconds", 0.99)]),
    ("Store commit (write + fsync)", "s", [hq("ptt_store_sync_seconds", 0.5), hq("ptt_store_sync_seconds", 0.99)]),
    ("Row: connections", None, None),
    ("Connections and sessions", "short", [q(f'sum(ptt_connections_open{{{J}}})', "connections"),
                                          q(f'sum(ptt_sessions_open{{{J}}})', "sessions")]),
    ("Handshakes / s by outcome", "ops", [q(f'sum by (outcome) (rate(ptt_handshakes_total{{{J}}}[$__rate_interval]))', "{{outcome}}")]),
    ("Refused connections / s", "ops", [q(f'sum by (reason) (rate(ptt_connections_rejected_total{{{J}}}[$__rate_interval]))', "{{reason}}"),
                                       q(f'sum by (reason) (rate(ptt_auth_failures_total{{{J}}}[$__rate_interval]))', "auth: {{reason}}")]),
    ("Channel floors / s", "ops", [q(f'sum(rate(ptt_floor_grants_total{{{J}}}[$__rate_interval]))', "granted"),
                                  q(f'sum(rate(ptt_floor_busy_total{{{J}}}[$__rate_interval]))', "busy"),
                                  q(f'sum(rate(ptt_floor_preemptions_total{{{J}}}[$__rate_interval]))', "pre-empted")]),
    ("Row: resources", None, None),
    ("Store fill", "percentunit", [q(f'sum(ptt_store_bytes{{{J}}}) / sum(ptt_store_limit_bytes{{{J}}})', "store"),
                                  q(f'sum(ptt_inflight_bytes{{{J}}}) / sum(ptt_inflight_limit_bytes{{{J}}})', "in-flight uploads")]),
    ("Stored copies waiting", "short", [q(f'sum(ptt_store_pending_copies{{{J}}})', "copies"),
                                       q(f'max(ptt_delivery_queue_depth_max{{{J}}})', "longest recipient queue"),
                                       q(f'sum(ptt_delivery_queue_depth{{{J}}})', "all queues")]),
    ("CPU (cores)", "short", [q(f'rate(process_cpu_seconds_total{{job="ptt-relay",{J}}}[$__rate_interval])', "{{instance}}")]),
    ("Memory (RSS)", "bytes", [q(f'process_resident_memory_bytes{{job="ptt-relay",{J}}}', "{{instance}}")]),
    ("Up / ready", "short", [q(f'up{{job="ptt-relay",{J}}}', "up {{instance}}"),
                            q(f'ptt_ready{{{J}}}', "ready {{instance}}")]),
    ("Row: cluster", None, None),
    ("Cluster link and held clips", "short", [q(f'ptt_cluster_connected{{{J}}}', "linked {{instance}}"),
                                             q(f'ptt_cluster_held_clips{{{J}}}', "held here only {{instance}}")]),
    ("Cluster backfill / s", "ops", [q(f'sum by (kind) (rate(ptt_cluster_backfilled_total{{{J}}}[$__rate_interval]))', "written {{kind}}"),
                                    q(f'sum by (kind) (rate(ptt_cluster_caught_up_total{{{J}}}[$__rate_interval]))', "caught up {{kind}}"),
                                    q(f'sum(rate(ptt_cluster_link_lost_total{{{J}}}[$__rate_interval]))', "links lost")]),
]

panels, y, x, pid = [], 0, 0, 1
for title, unit, targets in PANELS:
    if unit is None:
        if x:
            y += 8
            x = 0
        panels.append({"id": pid, "type": "row", "title": title[5:], "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
    else:
        refs = "ABCDEFGH"
        panels.append({
            "id": pid, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}},
            "targets": [dict(t, refId=refs[i]) for i, t in enumerate(targets)],
        })
        x += 8
        if x == 24:
            x, y = 0, y + 8
    pid += 1

dash = {
    "uid": "ptt-relay",
    "title": "ptt-relay",
    "tags": ["ptt-relay"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-3h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
        {"name": "instance", "type": "query", "datasource": DS, "includeAll": True, "multi": True,
         "query": {"query": 'label_values(ptt_build_info, instance)', "refId": "instance"},
         "definition": "label_values(ptt_build_info, instance)", "refresh": 2, "current": {}},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
out = pathlib.Path(__file__).resolve().parent.parent / "deploy/grafana/dashboards/ptt-relay.json"
out.write_text(json.dumps(dash, indent=2) + "\n")
print(out)
