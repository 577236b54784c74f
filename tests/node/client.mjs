// Talks to botline's /openai/v1 with the official openai package, as a Node user would.
// Usage: BOTLINE_BASE_URL=... BOTLINE_KEY=... node client.mjs whole|stream|models|badkey
// Prints one JSON object describing what the SDK returned.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.BOTLINE_BASE_URL,
  apiKey: process.env.BOTLINE_KEY,
  maxRetries: 0,
});
const messages = [{ role: "user", content: "hello from node" }];
const mode = process.argv[2];

if (mode === "whole") {
  const completion = await client.chat.completions.create({ model: "any", messages });
  console.log(JSON.stringify({
    object: completion.object,
    content: completion.choices[0].message.content,
    finish_reason: completion.choices[0].finish_reason,
    usage: completion.usage,
  }));
} else if (mode === "stream") {
  const stream = await client.chat.completions.create({
    model: "any",
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  let content = "";
  let finish = null;
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      content += choice.delta.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
  }
  console.log(JSON.stringify({ content, finish_reason: finish, usage, chunks }));
} else if (mode === "badkey") {
  try {
    await client.chat.completions.create({ model: "any", messages });
    console.log(JSON.stringify({ raised: null }));
  } catch (err) {
    console.log(JSON.stringify({ raised: err.constructor.name, status: err.status }));
  }
} else {
  throw new Error(`unknown mode ${mode}`);
}
