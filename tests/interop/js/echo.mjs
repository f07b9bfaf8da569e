// MQTT.js echo client for tests/interop/test_mqttjs.py.
//
// Usage: node echo.mjs URL CA_FILE|- PROTOCOL_VERSION COUNT
//   URL: ws://host:port/mqtt, wss://host:port/mqtt or mqtts://host:port
//   CA_FILE: the only CA trusted for wss/mqtts ("-" for none)
//
// Connects, subscribes to mqttjs/in at QoS 1 and prints "READY" once subscribed. Every
// message received there is published again to mqttjs/out at QoS 1. Once COUNT distinct
// payloads have arrived and all their republications are acknowledged it prints
// "DONE <count>" and disconnects. Any error, or 20 s without finishing, exits non-zero.
import fs from "node:fs";
import mqtt from "mqtt";

const [url, caFile, version, countArg] = process.argv.slice(2);
const count = Number(countArg);
const options = {
  protocolVersion: Number(version),
  clientId: `mqttjs-${process.pid}`,
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 10_000,
};
if (caFile !== "-") {
  options.ca = fs.readFileSync(caFile);
  options.rejectUnauthorized = true;
}

const fail = (why) => {
  console.log(`ERROR ${why}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 20_000).unref();

const client = mqtt.connect(url, options);
const seen = new Set();
let acked = 0;
client.on("error", (e) => fail(e.message));
client.on("close", () => {
  if (acked < count) fail("connection closed");
});
client.on("connect", () => {
  client.subscribe("mqttjs/in", { qos: 1 }, (err, granted) => {
    if (err) fail(err.message);
    if (granted[0].qos !== 1) fail(`granted QoS ${granted[0].qos}`);
    console.log("READY");
  });
});
client.on("message", (topic, payload) => {
  const key = payload.toString();
  if (seen.has(key)) return; // a redelivery: already echoed
  seen.add(key);
  client.publish("mqttjs/out", payload, { qos: 1 }, (err) => {
    if (err) fail(err.message);
    acked += 1;
    if (acked === count) {
      console.log(`DONE ${acked}`);
      client.end(false, () => process.exit(0));
    }
  });
});
