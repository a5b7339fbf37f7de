"""A few KB of plain English text the demo tokenizer is trained on (see demo_model.py).

Kept as a Python module so it ships inside the package without package-data settings.
Changing it changes the demo tokenizer (and so the demo model).
"""

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog does not mind; it is a very lazy dog.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Once upon a time there was a small town by the sea. The people of the town were fishermen and bakers,
teachers and doctors, and every morning the bells of the old church rang seven times.
A language model reads a sequence of tokens and predicts the next one. It does this again and again,
one token at a time, until it reaches the end of the answer or the limit on the number of tokens.
The weights of a large model take a lot of memory. If each weight is stored with four bits instead of
sixteen, the model needs four times less memory, and a matrix multiplication can read the weights faster.
Quantization maps every weight to one of sixteen levels. A group of weights shares one scale and one zero point.
The scale is the size of one step, and the zero point is the level that stands for the number zero.
To use the weights, the kernel subtracts the zero point and multiplies by the scale. This is called dequantization.
Graphics processors have tensor cores that multiply small tiles of matrices very quickly.
Each thread of a warp holds a few values of a tile in its registers. When the weights are stored in the
right order, every thread can load its values with one wide read and use them at once.
The sun rises in the east and sets in the west. In summer the days are long and the nights are short.
In winter it is cold, the rivers freeze, and children build snowmen in the garden.
My favourite colours are blue and green. The sky is blue, the grass is green, and the apples are red.
There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
There are twelve months in a year. January is the first month and December is the last one.
One, two, three, four, five, six, seven, eight, nine, ten. Numbers can be added, subtracted, multiplied and divided.
Two plus two is four. Ten minus three is seven. Six times seven is forty two. Twelve divided by four is three.
The library opens at nine in the morning and closes at six in the evening. Please return your books on time.
Water boils at one hundred degrees and freezes at zero degrees. Ice is lighter than water, so it floats.
The cat sat on the mat and looked out of the window. A bird was singing in the tree near the house.
She opened the door, walked into the kitchen and made a cup of tea. Then she sat down and read the news.
He likes to walk in the park with his friends. They talk about music, books, films and the weather.
The server receives a request, runs the model on a batch of prompts, and streams the tokens back to the client.
A good program is simple, clear and well tested. Small functions with clear names are easy to read.
When a test fails, read the error message carefully. It often tells you exactly what went wrong and where.
Please answer the question in one short sentence. Thank you for your help, and have a nice day!
What is the capital of France? The capital of France is Paris. What is the capital of Italy? It is Rome.
The train leaves the station at ten past eight and arrives in the city an hour later.
Good morning, everyone. Today we will learn how computers store numbers, letters and pictures.
A byte has eight bits. Four bits are called a nibble, and a nibble can hold a number from zero to fifteen.
Eight nibbles fit into one thirty two bit word. The order of the nibbles inside the word is part of the format.
The mountains were covered with snow, and the valley below was full of flowers and tall green trees.
We walked along the river until the path turned towards the forest, where it was quiet and dark.
Thank you very much for the lovely dinner. The soup was hot, the bread was fresh and the cake was sweet.
If you have any questions, please ask. I will do my best to give you a clear and helpful answer.
The assistant listens to the user and answers politely. The user asks a question and waits for the reply.
Reading, writing and counting are useful skills. Practice a little every day and you will get better.
The first rule of the kitchen is to wash your hands. The second rule is to clean up after yourself.
Stars shine at night. The moon goes around the earth, and the earth goes around the sun once a year.
A friend in need is a friend indeed. Actions speak louder than words. Practice makes perfect.
The end of the story is happy: the fox and the dog become friends, and they play in the field every day.
"""
